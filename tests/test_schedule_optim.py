"""Learning-rate schedule and fully decoupled AdamW."""
import math

import pytest
import torch

from pretrain.optim import build_optimizer, param_groups
from pretrain.schedule import lr_multiplier


def test_schedule_shape():
    S, W, frac = 1000, 100, 0.2
    m = [lr_multiplier(s, S, W, frac) for s in range(S)]
    assert m[0] == pytest.approx(1 / W) and m[W - 1] == pytest.approx(1.0)
    assert all(x == 1.0 for x in m[W:800])  # constant phase
    for s in range(800, S):  # 1 - sqrt cool-down to zero over the last 20%
        assert m[s] == pytest.approx(1 - math.sqrt((s - 800) / 200))
    assert 0 < m[-1] < 0.1 and all(a >= b for a, b in zip(m[800:], m[801:]))


def test_weight_decay_not_scaled_by_peak_lr():
    """After one step with zero gradient the decay equals wd * lr_t/peak, whatever the peak lr."""
    for peak in (1e-3, 1e-1):
        lin = torch.nn.Linear(4, 4, bias=True)
        w0 = lin.weight.detach().clone()
        b0 = lin.bias.detach().clone()
        opt = build_optimizer(param_groups(lin, peak, weight_decay=0.1), (0.9, 0.95), 1e-8)
        for p in lin.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        torch.testing.assert_close(lin.weight.detach(), w0 * (1 - 0.1))
        torch.testing.assert_close(lin.bias.detach(), b0)  # biases and norms are not decayed
