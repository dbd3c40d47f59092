"""Fully decoupled AdamW and its parameter groups.

"Fully decoupled" weight decay (Loshchilov & Hutter; the paper's optimizer): the decay applied at
step t is `weight_decay * lr_t / peak_lr`, i.e. it follows the schedule's shape but is not scaled by
the peak learning rate, so sweeping the learning rate does not change the regularisation. With
torch's AdamW (which decays by `lr_t * wd`) that is `wd_torch = weight_decay / peak_lr_of_group`.
Norm gains and biases are not decayed.
"""
from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """AdamW groups: (decayed, not decayed) x learning-rate multiplier.

    A parameter may carry `lr_mult` (set by a model family, e.g. late fusion's vision encoder)."""
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        mult = float(getattr(p, "lr_mult", 1.0))
        decay = p.dim() >= 2
        groups.setdefault((mult, decay), []).append(p)
    out = []
    for (mult, decay), params in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        group_lr = lr * mult
        out.append({"params": params, "lr": group_lr, "lr_mult": mult,
                    "weight_decay": (weight_decay / group_lr) if (decay and group_lr > 0) else 0.0,
                    "name": f"lr_x{mult:g}_{'decay' if decay else 'no_decay'}"})
    return out


def build_optimizer(groups: list[dict], betas: tuple[float, float], eps: float) -> torch.optim.Optimizer:
    kwargs = {"betas": betas, "eps": eps}
    if torch.cuda.is_available():
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)
