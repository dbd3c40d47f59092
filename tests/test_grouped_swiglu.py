"""Tests for kernels/grouped_swiglu.py: the fused w1/w3 SwiGLU kernel against float64.

Under TRITON_INTERPRET=1 (set by conftest.py without a GPU) with 16x16x16 tiles; the group
patterns (empty experts, a single row, every row in one expert, no rows) are those of
tests/test_grouped_gemm.py. K and N are not multiples of the tile.

Run:  .venv/bin/python -m pytest tests/test_grouped_swiglu.py -q
"""
import pytest
import torch

from kernels import grouped_gemm as gg
from kernels.grouped_swiglu import grouped_swiglu
from tests.test_grouped_gemm import DEVICE, PATTERNS, TOL, _inputs, _rel

if not torch.cuda.is_available() and not gg._INTERPRET:
    pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1 (set by conftest)", allow_module_level=True)


def _run(backend, x, w1, w3, counts, dh):
    x, w1, w3 = (t.detach().clone().requires_grad_() for t in (x, w1, w3))
    h = grouped_swiglu(x, w1, w3, counts, backend=backend)
    grads = torch.autograd.grad(h, (x, w1, w3), dh.to(h.dtype)) if h.numel() else (
        torch.zeros_like(x), torch.zeros_like(w1), torch.zeros_like(w3))
    return (h,) + tuple(grads)


@pytest.mark.parametrize("pattern,dtype", [
    ("random_with_empty_2", torch.float32), ("single_row", torch.float32), ("no_rows", torch.float32),
    ("one_group_all_rows", torch.float16), ("single_row", torch.float16)])
def test_fused_swiglu_matches_float64(pattern, dtype):
    counts_E = PATTERNS[pattern]
    K, N = 40, 20
    x, w1, dh = _inputs(counts_E, K, N, dtype)
    w3 = (torch.randn(w1.shape, generator=torch.Generator().manual_seed(int(counts_E.sum()) + 7))
          / K ** 0.5).to(DEVICE, dtype)
    counts = counts_E.to(DEVICE)
    got = _run("triton", x, w1, w3, counts, dh)
    ref = _run("reference", x.double(), w1.double(), w3.double(), counts, dh.double())
    for name, g, r in zip(("h", "dX", "dW1", "dW3"), got, ref):
        assert g.dtype == dtype and g.shape == r.shape, name
        if r.numel() and r.abs().max() > 0:
            err = _rel(g, r)
            assert err < TOL[dtype], f"{name}: relative error {err:.2e} >= {TOL[dtype]:.0e}"
    for e in torch.nonzero(counts_E == 0).flatten().tolist():
        assert torch.count_nonzero(got[2][e]) == 0 and torch.count_nonzero(got[3][e]) == 0, e


def test_fused_swiglu_no_host_sync_and_moe_layout_unchanged(monkeypatch):
    from pretrain.models.config import MoEConfig
    from pretrain.models.moe import MoEFFN
    torch.manual_seed(0)
    layer = MoEFFN(24, 40, MoEConfig(num_experts=4, top_k=1, backend="triton"))
    # The fused kernel reads the two parameters in place: names and shapes stay what export and
    # checkpoint resharding expect.
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items() if k.startswith("experts.")}
    assert shapes == {"experts.w1_EDH": (4, 24, 40), "experts.w3_EDH": (4, 24, 40),
                      "experts.w2_EHD": (4, 40, 24)}
    x = torch.randn(2, 9, 24, device=DEVICE, requires_grad=True)
    ref_layer = MoEFFN(24, 40, MoEConfig(num_experts=4, top_k=1, backend="reference"))
    ref_layer.load_state_dict(layer.state_dict())
    want = ref_layer.double()(x.detach().double())

    def forbidden(*_a, **_k):
        raise AssertionError("host read in the fused expert path")

    counts = torch.tensor([3, 0, 5, 10], device=DEVICE)
    xs = torch.randn(18, 24, device=DEVICE, requires_grad=True)
    for name in ("tolist", "item", "__int__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    layer.experts(xs, counts).sum().backward()
    monkeypatch.undo()
    got = layer(x)
    assert _rel(got, want) < 1e-3
