"""The Triton backend of `packed_attention` against a float64 reference, on CPU.

Runs the real kernels through Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py when
there is no GPU) with 16-wide tiles, so tiny shapes still cover many tiles, partial tiles, and
all three tile classes (skipped, masked, fully allowed). bf16 is not tested here: the interpreter's
`tl.dot` is wrong for bf16; fp32 and fp16 are. On a GPU the same file runs the compiled kernels.

Run: `pytest tests/test_attention_triton.py -q` (about a minute on 2 CPU cores).
"""
import pytest
import torch

from kernels.attention import attention_ranges, packed_attention
from kernels.attention_layouts import edge_layouts, random_layout
from kernels.attention_triton import TileConfig, set_tile_config, tile_config, tile_schedule

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=3e-5, rtol=1e-4), torch.float16: dict(atol=6e-3, rtol=1e-2)}


def _inputs(B, H, T, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g, dtype=torch.float64) for _ in range(4)]  # q, k, v, dO


def check_against_reference(doc_BT, img_BT, H, D, dtype, seed, scale=None):
    """Output and dq, dk, dv of the Triton backend vs the float64 reference on the same inputs."""
    B, T = doc_BT.shape
    q64, k64, v64, do64 = _inputs(B, H, T, D, dtype, seed)
    ours = [x.to(DEV, dtype).requires_grad_() for x in (q64, k64, v64)]
    out = packed_attention(*ours, doc_BT.to(DEV), img_BT.to(DEV), backend="triton", scale=scale)
    out.backward(do64.to(DEV, dtype))
    # The reference sees the same (rounded) inputs, in float64.
    ref = [x.detach().cpu().double().requires_grad_() for x in ours]
    ref_out = packed_attention(*ref, doc_BT, img_BT, backend="reference", scale=scale)
    ref_out.backward(do64.to(dtype).double())
    assert out.dtype == dtype and out.shape == (B, H, T, D)
    for name, a, b in [("out", out, ref_out)] + [(f"d{n}", x.grad, r.grad) for n, x, r in zip("qkv", ours, ref)]:
        a = a.detach().cpu().double()
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        torch.testing.assert_close(a, b.detach(), **TOL[dtype], msg=lambda m: f"{name}: {m}")


@pytest.fixture(autouse=True)
def small_tiles():
    # Default CPU tiles are 16x16; make it explicit and restore afterwards.
    set_tile_config(None if DEV == "cuda" else TileConfig(16, 16, 16, 16, 16, 16, 1, 1, 1, 1))
    yield
    set_tile_config(None)


# Head dims 16, 80 (two chunks, 64 + 16) and 128; T not a multiple of 16.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("D", [16, 80, 128])
def test_random_layouts(dtype, D):
    n_full = n_skipped = 0
    for k, T in enumerate([45, 77]):
        seed = 1000 * D + 10 * k + (dtype == torch.float16)
        doc_BT, img_BT = random_layout(2, T, seed=seed)
        r = attention_ranges(doc_BT, img_BT)
        visited, full = tile_schedule(r.kv_start, r.kv_end, 16, 16, T)
        n_full, n_skipped = n_full + int(full.sum()), n_skipped + int((~visited).sum())
        check_against_reference(doc_BT, img_BT, H=2, D=D, dtype=dtype, seed=seed)
    assert n_full > 0 and n_skipped > 0, "layouts should exercise unmasked and skipped tiles"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("T", [1, 5, 40])
def test_edge_layouts(dtype, T):
    # Images at the start/end of rows and documents, one-token documents, all-padding rows,
    # causal-only text, one bidirectional image filling the row.
    for n, (name, doc_BT, img_BT) in enumerate(edge_layouts(T)):
        check_against_reference(doc_BT, img_BT, H=1, D=16, dtype=dtype, seed=7 * T + n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("D", [48, 96, 112])
def test_split_head_dims(dtype, D):
    # Head dims that are not powers of two run as two power-of-two chunks (48 = 32 + 16,
    # 96 = 64 + 32, 112 = 64 + 64 with the last 16 columns masked): a single token, a T that is
    # not a multiple of the tile, images and one-token documents.
    from kernels.attention_triton import head_dim_chunks, padded_head_dim
    c = head_dim_chunks(D)
    rest = D - c["BLOCK_D0"]
    assert c["SPLIT_D"] and c["BLOCK_D0"] + c["BLOCK_D1"] >= D
    assert padded_head_dim(D) == D or rest & (rest - 1), "a power-of-two remainder needs no padding"
    for k, T in enumerate([1, 29]):
        doc_BT, img_BT = random_layout(1, T, seed=50 * D + k)
        check_against_reference(doc_BT, img_BT, H=1, D=D, dtype=dtype, seed=D + k)


def test_many_tiny_documents_and_custom_scale():
    doc_BT, img_BT = random_layout(2, 60, seed=5, max_doc=3, max_img=2)
    check_against_reference(doc_BT, img_BT, H=2, D=32, dtype=torch.float32, seed=11, scale=0.37)


def test_non_square_tiles():
    set_tile_config(TileConfig(32, 16, 16, 32, 32, 16, 1, 1, 1, 1))
    doc_BT, img_BT = random_layout(1, 70, seed=9)
    check_against_reference(doc_BT, img_BT, H=2, D=96, dtype=torch.float32, seed=12)


def test_strided_inputs_deterministic_and_no_nan():
    # q, k, v as the model may hand them: [B, T, H, D] transposed to [B, H, T, D] (not contiguous).
    B, T, H, D = 2, 50, 2, 32
    doc_BT, img_BT = random_layout(B, T, seed=21)
    g = torch.Generator().manual_seed(3)
    x_BTHD = [torch.randn(B, T, H, D, generator=g).to(DEV) for _ in range(3)]
    do = torch.randn(B, H, T, D, generator=g).to(DEV)
    results = []
    for _ in range(2):
        qkv = [x.clone().requires_grad_() for x in x_BTHD]
        out = packed_attention(*(x.transpose(1, 2) for x in qkv), doc_BT.to(DEV), img_BT.to(DEV), backend="triton")
        out.backward(do)
        results.append([out.detach()] + [x.grad for x in qkv])
    ref = packed_attention(*(x.double().transpose(1, 2) for x in x_BTHD), doc_BT.to(DEV), img_BT.to(DEV),
                           backend="reference")
    torch.testing.assert_close(results[0][0].double(), ref, **TOL[torch.float32])
    for a, b in zip(*results):
        assert torch.equal(a, b), "two identical calls differ: the kernel is not deterministic"
        assert torch.isfinite(a).all()


def test_fully_masked_tiles_are_never_visited():
    # NaN in V at one key poisons (0 * NaN) every query row whose program loads that key's tile,
    # so the NaN rows of the output reveal exactly which tiles each program visited. Likewise NaN
    # in dO at one query reveals which key tiles' dK/dV programs loaded it.
    T, D = 64, 16
    # doc 0: text [0,16), image [16,36), text [36,40); doc 1: text [40,64). The image rows see
    # key tiles 0 and 1 unmasked; the last query tile skips key tiles 0 and 1.
    doc_BT = torch.tensor([[0] * 40 + [1] * 24], dtype=torch.int32)
    img_BT = torch.tensor([[-1] * 16 + [0] * 20 + [-1] * 28], dtype=torch.int32)
    r = attention_ranges(doc_BT, img_BT)
    cfg = tile_config(torch.empty(0, device=DEV))
    visited_fwd, full_fwd = tile_schedule(r.kv_start, r.kv_end, cfg.fwd_m, cfg.fwd_n, T)
    visited_bwd, _ = tile_schedule(r.q_start, r.q_end, cfg.dkdv_n, cfg.dkdv_m, T)
    assert not visited_fwd.all() and full_fwd.any(), "layout must have skipped and full tiles"
    for j in (5, 33, 60):
        q, k, v = (torch.randn(1, 1, T, D, device=DEV) for _ in range(3))
        v[0, 0, j] = float("nan")
        q.requires_grad_()
        k.requires_grad_()
        out = packed_attention(q, k, v, doc_BT.to(DEV), img_BT.to(DEV), backend="triton")
        nan_rows = torch.isnan(out[0, 0]).any(-1).cpu()
        expect = visited_fwd[0, :, j // cfg.fwd_n].repeat_interleave(cfg.fwd_m)[:T]
        assert torch.equal(nan_rows, expect)
        do = torch.randn_like(out)
        do[0, 0, j] = float("nan")
        out2 = packed_attention(q, k, torch.randn_like(v), doc_BT.to(DEV), img_BT.to(DEV), backend="triton")
        out2.backward(do)
        nan_keys = torch.isnan(k.grad[0, 0]).any(-1).cpu()
        expect = visited_bwd[0, :, j // cfg.dkdv_m].repeat_interleave(cfg.dkdv_n)[:T]
        assert torch.equal(nan_keys, expect)


def test_rejects_unsupported_head_dim():
    doc_BT, img_BT = random_layout(1, 8, seed=0)
    q = torch.randn(1, 1, 8, 24, device=DEV)
    with pytest.raises(ValueError, match="multiples of 16"):
        packed_attention(q, q, q, doc_BT.to(DEV), img_BT.to(DEV), backend="triton")


def test_kernels_compile_for_h100_without_a_gpu():
    # The interpreter never runs Triton's compiler; compile the default bf16 GPU configs for
    # sm_90 ahead of time (no GPU needed), specialised as a real launch is (divisibility hints),
    # so that a kernel that would not compile, or a tile config that does not fit in shared
    # memory, fails here and not on the first GPU run. Dh = 128 has the largest tiles; 96 runs
    # the two-chunk head dim.
    import glob
    import os
    import subprocess
    import sys

    import triton
    if not glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas*")):
        pytest.skip("this Triton build ships no ptxas for NVIDIA targets")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-m", "kernels.attention_aot", "--arch", "90", "--head-dims", "96", "128"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [l for l in res.stdout.splitlines() if "shared" in l]
    assert len(lines) == 6, res.stdout
    for line in lines:
        shared = int(line.split("shared ")[1].split(" B")[0])
        assert shared <= 227 * 1024, line  # H100: 227 KiB of shared memory per block
        assert int(line.split("hints ")[1].split(",")[0]) > 0, line  # compiled as launched
        assert "ptxas error" not in line, line
