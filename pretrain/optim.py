"""Fully decoupled AdamW and its parameter groups.

"Fully decoupled" weight decay (Loshchilov & Hutter; the paper's optimizer): the decay applied at
step t is `weight_decay * lr_t / peak_lr`, i.e. it follows the schedule's shape but is not scaled by
the peak learning rate, so sweeping the learning rate does not change the regularisation. With
torch's AdamW (which decays by `lr_t * wd`) that is `wd_torch = weight_decay / peak_lr_of_group`.
Norm gains and biases are not decayed.

A parameter may carry `lr_mult` (its group's peak learning rate is `lr * lr_mult`) and `wd_mult`
(its decay is `weight_decay * wd_mult`). Late fusion's encoder sets both to `model.vision.lr_mult`
unless `model.vision.decay_with_lr_mult=false` (pretrain/models/late_fusion.py): with a 100x
smaller learning rate, the full decay would shrink the encoder 100x faster relative to its
updates (e^-2 over 20k steps at 1e-4), pulling a pretrained encoder towards zero. Frozen
parameters (`requires_grad=False`, e.g. `lr_mult=0`) are in no group: no moments, no decay.
"""
from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """AdamW groups: (lr multiplier, decayed or not, decay multiplier); frozen parameters left out."""
    groups: dict[tuple[float, bool, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        mult = float(getattr(p, "lr_mult", 1.0))
        if mult == 0:
            raise ValueError(f"param_groups: {name} has lr_mult 0 but requires grad; freeze it instead "
                             f"(requires_grad_(False)) so that it gets no gradient and no optimizer state")
        decay = p.dim() >= 2
        groups.setdefault((mult, decay, float(getattr(p, "wd_mult", 1.0)) if decay else 0.0), []).append(p)
    out = []
    for (mult, decay, wd_mult), params in sorted(groups.items()):
        group_lr = lr * mult
        name = f"lr_x{mult:g}_{'decay' if decay else 'no_decay'}" + (f"_x{wd_mult:g}" if decay and wd_mult != 1 else "")
        out.append({"params": params, "lr": group_lr, "lr_mult": mult,
                    "weight_decay": weight_decay * wd_mult / group_lr if decay and group_lr > 0 else 0.0, "name": name})
    return out


def base_lr(optimizer: torch.optim.Optimizer) -> float:
    """The schedule's current learning rate (a group's lr divided by its `lr_mult`)."""
    g = max(optimizer.param_groups, key=lambda g: g.get("lr_mult", 1.0))
    return g["lr"] / g.get("lr_mult", 1.0)


def build_optimizer(groups: list[dict], betas: tuple[float, float], eps: float) -> torch.optim.Optimizer:
    kwargs = {"betas": betas, "eps": eps}
    if torch.cuda.is_available():
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)
