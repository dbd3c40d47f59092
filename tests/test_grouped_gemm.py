"""Tests for kernels/grouped_gemm.py: the Triton grouped GEMM against a float64 reference.

On a CPU-only machine tests/conftest.py sets TRITON_INTERPRET=1 before the kernel module is
imported, so the Triton kernels run in the interpreter with 16x16x16 tiles. Shapes are tiny but
chosen so that groups span several row-blocks, K and N are not multiples of the tile, and some
groups are empty, a single row, or every row.

Run:  .venv/bin/python -m pytest tests/test_grouped_gemm.py -q
"""
import pytest
import torch

from kernels import grouped_gemm as gg
from kernels.grouped_gemm import grouped_gemm

if not torch.cuda.is_available() and not gg._INTERPRET:
    pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1 (set by conftest)", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NUM_EXPERTS = 8

# Relative (Frobenius) error bounds against float64. fp32: the acceptance bound of issue 4.
# fp16/bf16: a few units of the output rounding (2**-11, 2**-8), since y, dX, dW are stored in
# the input dtype.
TOL = {torch.float32: 1e-3, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _random_counts(gen, M, E, n_empty):
    """E counts summing to M with at least n_empty zero groups (multinomial over the rest)."""
    live = torch.randperm(E, generator=gen)[: E - n_empty]
    counts = torch.zeros(E, dtype=torch.int64)
    picks = live[torch.randint(len(live), (M,), generator=gen)]
    counts.scatter_add_(0, picks, torch.ones(M, dtype=torch.int64))
    return counts


def _group_patterns():
    gen = torch.Generator().manual_seed(1234)
    return {
        "random_with_empty": _random_counts(gen, 60, NUM_EXPERTS, n_empty=3),
        "random_with_empty_2": _random_counts(gen, 37, NUM_EXPERTS, n_empty=5),
        "single_row": torch.tensor([0, 0, 1, 0, 0, 0, 0, 0]),
        "one_group_all_rows": torch.tensor([0, 0, 0, 0, 0, 53, 0, 0]),
        "mixed_sizes": torch.tensor([1, 0, 17, 16, 0, 2, 20, 1]),
        "no_rows": torch.zeros(NUM_EXPERTS, dtype=torch.int64),
    }


PATTERNS = _group_patterns()
_seed = iter(range(10_000, 20_000))  # every check draws fresh inputs


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _run(backend, x_MK, w_EKN, counts_E, dy_MN):
    x = x_MK.detach().clone().requires_grad_()
    w = w_EKN.detach().clone().requires_grad_()
    y = grouped_gemm(x, w, counts_E, backend=backend)
    dx, dw = torch.autograd.grad(y, (x, w), dy_MN.to(y.dtype)) if y.numel() else (
        torch.zeros_like(x), torch.zeros_like(w))
    return y, dx, dw


def _inputs(counts_E, K, N, dtype):
    gen = torch.Generator().manual_seed(next(_seed))
    M = int(counts_E.sum())
    x = torch.randn(M, K, generator=gen).to(dtype)
    w = (torch.randn(len(counts_E), K, N, generator=gen) / K**0.5).to(dtype)
    dy = torch.randn(M, N, generator=gen).to(dtype)
    return x.to(DEVICE), w.to(DEVICE), dy.to(DEVICE)


def _check_against_float64(backend, counts_E, K, N, dtype):
    x, w, dy = _inputs(counts_E, K, N, dtype)
    counts = counts_E.to(DEVICE)
    y, dx, dw = _run(backend, x, w, counts, dy)
    y64, dx64, dw64 = _run("reference", x.double(), w.double(), counts, dy.double())
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype
    assert y.shape == y64.shape and dw.shape == w.shape
    if y.numel():
        for name, got, ref in (("y", y, y64), ("dX", dx, dx64), ("dW", dw, dw64)):
            err = _rel(got, ref)
            assert err < TOL[dtype], f"{name}: relative error {err:.2e} >= {TOL[dtype]:.0e}"
    # An expert with no rows gets an exactly-zero weight gradient (not merely small).
    for e in torch.nonzero(counts_E == 0).flatten().tolist():
        assert torch.count_nonzero(dw[e]) == 0, f"expert {e} has no rows but a nonzero dW"


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_matches_float64_reference(pattern, dtype):
    # K=40, N=24: neither a multiple of the 16-wide tiles, several K steps.
    _check_against_float64("triton", PATTERNS[pattern], K=40, N=24, dtype=dtype)


@pytest.mark.parametrize("pattern", ["random_with_empty", "one_group_all_rows"])
def test_triton_bf16(pattern):
    # bf16 runs too: under the interpreter the kernel upcasts tiles before tl.dot (its bf16 dot
    # is wrong on CPU); on GPU this is the real tensor-core path.
    _check_against_float64("triton", PATTERNS[pattern], K=32, N=48, dtype=torch.bfloat16)


def test_triton_even_k_and_int32_counts():
    # K a multiple of BLOCK_K takes the unmasked-K branch; int32 counts as a router may give.
    counts = PATTERNS["mixed_sizes"].to(torch.int32)
    _check_against_float64("triton", counts, K=32, N=16, dtype=torch.float32)


def test_triton_strided_inputs_and_broadcast_grad():
    # Non-contiguous x and w (views), and the stride-0 gradient that y.sum() produces.
    counts = PATTERNS["random_with_empty"]
    M, K, N = int(counts.sum()), 24, 20
    gen = torch.Generator().manual_seed(next(_seed))
    x_KM = torch.randn(K, M, generator=gen, dtype=torch.float64)
    w_ENK = torch.randn(NUM_EXPERTS, N, K, generator=gen, dtype=torch.float64)
    grads = {}
    for backend, dtype in (("triton", torch.float32), ("reference", torch.float64)):
        x = x_KM.to(DEVICE, dtype).requires_grad_()
        w = w_ENK.to(DEVICE, dtype).requires_grad_()
        y = grouped_gemm(x.t(), w.transpose(1, 2), counts.to(DEVICE), backend=backend)
        y.sum().backward()
        grads[backend] = (y.detach(), x.grad, w.grad)
    for got, ref in zip(grads["triton"], grads["reference"]):
        assert _rel(got, ref) < 1e-3


def test_triton_launch_does_not_read_counts_on_host(monkeypatch):
    # The launch path must never pull the counts to the host. Forbid the usual ways of doing so
    # while the forward and backward run (the interpreter itself moves tensors with .numpy()).
    counts = PATTERNS["random_with_empty"].to(DEVICE)
    x, w, dy = _inputs(counts.cpu(), 16, 16, torch.float32)
    x.requires_grad_()
    w.requires_grad_()

    def forbidden(*_a, **_k):
        raise AssertionError("host read of a tensor in the grouped GEMM launch path")

    for name in ("tolist", "item", "__int__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    y = grouped_gemm(x, w, counts, backend="triton")
    y.backward(dy)
    with pytest.raises(AssertionError, match="host read"):  # the trap works: the reference syncs
        grouped_gemm(x, w, counts, backend="reference")
    monkeypatch.undo()
    assert torch.isfinite(w.grad).all()


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm not in this torch")
@pytest.mark.parametrize("pattern", ["random_with_empty", "single_row", "one_group_all_rows"])
def test_torch_backend_matches_reference(pattern):
    # On CPU torch._grouped_mm runs PyTorch's fallback (fp32 here); on GPU bf16 is its fast path.
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    _check_against_float64("torch", PATTERNS[pattern], K=32, N=16, dtype=dtype)


def test_torch_backend_broadcast_grad():
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not in this torch")
    counts = PATTERNS["mixed_sizes"]
    x = torch.randn(int(counts.sum()), 16, device=DEVICE, requires_grad=True)
    w = torch.randn(NUM_EXPERTS, 16, 8, device=DEVICE, requires_grad=True)
    grouped_gemm(x, w, counts.to(DEVICE), backend="torch").sum().backward()  # stride-0 grad
    assert torch.count_nonzero(w.grad[1]) == 0 and torch.count_nonzero(w.grad[4]) == 0


def test_dispatch_rejects_bad_arguments():
    x = torch.randn(4, 8)
    w = torch.randn(2, 8, 3)
    counts = torch.tensor([1, 3])
    with pytest.raises(ValueError, match="unknown backend"):
        grouped_gemm(x, w, counts, backend="cutlass")
    with pytest.raises(ValueError, match="share a dtype"):
        grouped_gemm(x, w.double(), counts)
    with pytest.raises(ValueError, match="shape mismatch"):
        grouped_gemm(x, torch.randn(3, 8, 3), counts)
    with pytest.raises(ValueError, match="sums to"):
        grouped_gemm(x, w, torch.tensor([1, 2]), backend="reference")
    with pytest.raises(ValueError, match="integer"):
        grouped_gemm(x, w, counts.float())


def test_triton_backend_refuses_cpu_without_interpreter(monkeypatch):
    monkeypatch.setattr(gg, "_INTERPRET", False)
    counts = torch.tensor([1, 3])
    with pytest.raises(RuntimeError, match="needs CUDA"):
        grouped_gemm(torch.randn(4, 8), torch.randn(2, 8, 3), counts, backend="triton")
