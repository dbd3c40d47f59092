"""Late fusion's encoder options: frozen (`model.vision.lr_mult=0`) and its weight decay
(`model.vision.decay_with_lr_mult`)."""
import math

import pytest
import torch

from pretrain.config import ConfigError, load_config
from pretrain.models import build_model
from pretrain.models.late_fusion import vision_parameters
from pretrain.optim import base_lr, build_optimizer, param_groups
from pretrain.schedule import lr_multiplier
from tests.helpers import REPO
from tests.test_late_fusion import packed_batch, tiny_cfg
from pretrain.models.config import VisionConfig


def _encoder_params(model):
    return {n: p for n, p in vision_parameters(model) if not n.startswith("image_embedder.proj.")}


def test_frozen_encoder_has_no_gradients_no_optimizer_state_and_a_finite_logged_lr():
    cfg = tiny_cfg(vision=VisionConfig(width=24, depth=2, head_dim=8, lr_mult=0.0))
    torch.manual_seed(0)
    model = build_model(cfg)
    frozen = _encoder_params(model)
    assert frozen and not any(p.requires_grad for p in frozen.values())
    before = {n: p.detach().clone() for n, p in frozen.items()}
    proj_before = model.image_embedder.proj.weight.detach().clone()
    lr, steps = 1e-2, 10
    opt = build_optimizer(param_groups(model, lr, 1e-4), (0.9, 0.95), 1e-8)
    in_groups = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not in_groups & {id(p) for p in frozen.values()}
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, steps, 2, 0.2))
    batch = packed_batch([[[3, "img", 5]], [[4, "img", 2, "img", 1]]], T=48, patch_dim=cfg.patch_dim,
                         n_p=cfg.patches_per_image)
    for step in range(3):
        model(batch).loss.backward()
        assert all(p.grad is None for p in frozen.values())
        assert model.image_embedder.proj.weight.grad is not None  # the connector still learns
        logged = base_lr(opt)
        assert math.isfinite(logged) and logged == pytest.approx(lr * lr_multiplier(step, steps, 2, 0.2))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    assert not {id(p) for p in frozen.values()} & {id(p) for p in opt.state}  # no moments
    for n, p in frozen.items():
        assert torch.equal(p.detach(), before[n]), n
    assert not torch.equal(model.image_embedder.proj.weight.detach(), proj_before)


@pytest.mark.parametrize("decay_with_lr_mult", [True, False])
def test_encoder_weight_decay_follows_its_learning_rate_multiplier(decay_with_lr_mult):
    """One step with zero gradients: only the decoupled decay moves the weights."""
    mult, wd, lr = 0.01, 0.1, 1e-3
    cfg = tiny_cfg(vision=VisionConfig(width=24, depth=2, head_dim=8, lr_mult=mult,
                                       decay_with_lr_mult=decay_with_lr_mult))
    model = build_model(cfg)
    opt = build_optimizer(param_groups(model, lr, wd), (0.9, 0.95), 1e-8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    enc = _encoder_params(model)
    for n, p in model.named_parameters():
        if p.dim() < 2:
            expected = before[n]
        elif n in enc:
            expected = before[n] * (1 - wd * (mult if decay_with_lr_mult else 1.0))
        else:
            expected = before[n] * (1 - wd)
        torch.testing.assert_close(p.detach(), expected, msg=lambda m: f"{n}: {m}")


def test_negative_lr_mult_is_a_config_error():
    with pytest.raises(ConfigError, match="model.vision.lr_mult"):
        load_config(REPO / "pretrain/configs/demo_late.yaml", ["model.vision.lr_mult=-0.1"]).validate()
