"""Grouped GEMM for dropless MoE experts: ``y_MN[rows of e] = x_MK[rows of e] @ w_EKN[e]``.

The rows of ``x_MK`` are sorted by expert: expert ``e`` owns the next ``tokens_per_expert_E[e]``
rows (possibly none). This is the matmul at the heart of a dropless mixture of experts
(MegaBlocks' "grouped" formulation): no capacity factor, no padding of groups to a fixed size.

Call :func:`grouped_gemm` (the dispatch function); it picks one of three backends:

* ``"reference"`` — a Python loop of ``torch.matmul`` over ``torch.split``; autograd does the
  backward. Runs anywhere, syncs the host (it needs the group sizes as Python ints).
* ``"triton"`` — the kernels below, wrapped in :class:`GroupedGemmFunction`. Forward and both
  gradients, no host synchronisation in the launch path. On CPU it runs only under
  ``TRITON_INTERPRET=1`` (what ``tests/conftest.py`` sets), with a small fixed tile.
* ``"torch"`` — ``torch._grouped_mm`` (PyTorch's CUTLASS grouped GEMM on sm90 for bf16; PyTorch's
  own fallback elsewhere, which in 2.13 includes CPU and fp32/fp16).

The file keeps the house's three layers apart: ``@triton.jit`` kernels, then the autograd
Function that launches them, then the plain-PyTorch reference, then the dispatch function.

Kernel design (backend="triton")
--------------------------------
Forward and dX use one kernel, ``_grouped_mm_kernel`` (dX is the same grouped GEMM against the
transposed weights, passed as a strided view, no copy). Its schedule is a flattened 1-D grid
over *virtual row-blocks*: each expert's rows are cut into ``ceil(m_e / BLOCK_M)`` blocks and the
blocks of all experts are numbered one after another. Every program loads the ``E`` group sizes
(a few bytes, L2-resident), does a cumsum in registers and finds which expert and row range its
block belongs to. The host therefore only needs an *upper bound* on the number of blocks,
``cdiv(M, BLOCK_M) + E`` (each group adds at most one partial block), which comes from shapes
alone; programs past the real count exit at once. Nothing is read back to the host, so the launch
never waits on the GPU (the one exception is Triton's autotuner, which benchmarks configs on the
first call for each new (N, K, dtype)). Tiles are visited in GROUP_M-swizzled order over the
virtual blocks so that neighbouring programs share weight tiles in L2.

dW uses ``_grouped_mm_dw_kernel``: one program per (expert, K-tile, N-tile), each reducing over
its expert's rows in chunks of BLOCK_M with a loop whose bounds are read from device memory. An
expert with no rows runs zero iterations and stores its zero accumulator: its gradient is exactly
zero. No atomics and no split reduction, so the result is deterministic. Experts are visited
largest first (ranked in registers from the counts), so under skewed routing the long tiles of a
busy expert start in the first wave. Known limit: when nearly every row goes to one expert, only
that expert's cdiv(K, BLOCK_K) * cdiv(N, BLOCK_N) tiles carry work (63 tiles for the up-projection
of width 800 with 128x256 tiles, fewer than an H100's 132 SMs); a split over rows would need
atomics or an fp32 workspace and was not worth it for E = 8 with a balancing loss.

All accumulation is fp32; outputs are cast to the input dtype. fp32 inputs use TF32 tensor cores
only when PyTorch would (``torch.get_float32_matmul_precision() != "highest"``).

Speed notes. Keep K and N multiples of 16 (every preset's are): Triton then specialises them as
such, the masked loads vectorise to 16 bytes, and the K loop is software-pipelined (cp.async +
async wgmma on sm90; checked by compiling the kernels offline for sm90 — with an N that is not a
multiple of 16, bf16 loads fall back to 2-byte accesses and lose pipelining). M is deliberately not
specialised (``do_not_specialize``) and not part of the autotune key, since it changes every step
under expert parallelism. The launch path has no host sync, so it is CUDA-graph capturable once
autotuning has run.

Run the tests:  ``.venv/bin/python -m pytest tests/test_grouped_gemm.py -q``
Benchmark (GPU): ``.venv/bin/python tools/bench_moe.py``
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

BACKENDS = ("reference", "triton", "torch")
__all__ = ["BACKENDS", "GroupedGemmFunction", "grouped_gemm", "grouped_gemm_reference"]

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when this module is imported.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# ──────────────────────────────────────────────────────────────────────────────────────────────
# Layer 1: Triton kernels
# ──────────────────────────────────────────────────────────────────────────────────────────────

@triton.jit
def _group_layout(tokens_per_expert_ptr, E: tl.constexpr, E_POW2: tl.constexpr):
    """Group sizes and their inclusive cumsum, as length-E_POW2 vectors (zero-padded)."""
    e_E = tl.arange(0, E_POW2)
    rows_E = tl.load(tokens_per_expert_ptr + e_E, mask=e_E < E, other=0).to(tl.int32)
    row_end_E = tl.cumsum(rows_E, 0)
    return e_E, rows_E, row_end_E


@triton.jit
def _pick(vec_E, sel_E):
    """vec_E[index] where sel_E is the one-hot of index (a gather from a register vector)."""
    return tl.sum(tl.where(sel_E, vec_E, 0), 0)


@triton.jit
def _virtual_row_block(pid, tokens_per_expert_ptr, M, N, E: tl.constexpr, E_POW2: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(n_live, expert, rows_m, mask_m, cols_n, mask_n) of program `pid` of a grid over (virtual
    row-block, column-block); programs with pid >= n_live are the surplus of the worst-case grid."""
    # Which virtual row-block is this program's? Computed here, not on the host, so the grid only
    # needs an upper bound and nothing is synchronised.
    e_E, rows_E, row_end_E = _group_layout(tokens_per_expert_ptr, E, E_POW2)
    blocks_E = (rows_E + BLOCK_M - 1) // BLOCK_M
    block_end_E = tl.cumsum(blocks_E, 0)
    num_pid_m = tl.sum(blocks_E, 0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    n_live = num_pid_m * num_pid_n

    # GROUP_M swizzle over (virtual row-block, column-block): programs that run together reuse the
    # same weight columns and the same rows of a from L2.
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.maximum(tl.minimum(num_pid_m - first_pid_m, GROUP_M), 1)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    # Expert = number of experts whose blocks all end at or before pid_m (empty experts own no
    # block, so they are skipped naturally).
    expert = tl.sum((block_end_E <= pid_m).to(tl.int32), 0)
    sel_E = e_E == expert
    block_start = _pick(block_end_E - blocks_E, sel_E)
    row_end = _pick(row_end_E, sel_E)
    row_start = row_end - _pick(rows_E, sel_E)
    row_end = tl.minimum(row_end, M)  # memory safety if the counts sum past M (caller's bug)
    rows_m = row_start + (pid_m - block_start) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rows_m < row_end
    cols_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return n_live, expert, rows_m, mask_m, cols_n, cols_n < N


@triton.jit
def _accumulate_k(acc, a_ptrs, b_ptrs, mask_m, mask_n, offs_k, K, stride_ak, stride_bk,
                  BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr):
    """acc += a[rows, :K] @ b[:K, cols], walking K in BLOCK_K steps from the given tile pointers."""
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=mask_n[None, :], other=0.0)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
            b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
        if UPCAST:  # the CPU interpreter's bf16 tl.dot is wrong; fp32 there is exact enough
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit(do_not_specialize=["M"])
def _grouped_mm_kernel(
    a_ptr, b_ptr, c_ptr, tokens_per_expert_ptr,
    M, N, K,
    stride_am, stride_ak,
    stride_be, stride_bk, stride_bn,
    stride_cm, stride_cn,
    E: tl.constexpr, E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """c[rows of e, :] = a[rows of e, :] @ b[e] for a [M, K], b [E, K, N] (any strides), c [M, N]."""
    pid = tl.program_id(0)
    n_live, expert, rows_m, mask_m, cols_n, mask_n = _virtual_row_block(
        pid, tokens_per_expert_ptr, M, N, E, E_POW2, BLOCK_M, BLOCK_N, GROUP_M)
    if pid >= n_live:
        return  # the grid is sized for the worst case; surplus programs leave at once
    offs_k = tl.arange(0, BLOCK_K)

    # int64 row and expert offsets: M*K and E*K*N can exceed 2**31 at the largest presets.
    a_ptrs = a_ptr + rows_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = (b_ptr + expert.to(tl.int64) * stride_be
              + offs_k[:, None] * stride_bk + cols_n[None, :] * stride_bn)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _accumulate_k(acc, a_ptrs, b_ptrs, mask_m, mask_n, offs_k, K, stride_ak, stride_bk,
                        BLOCK_K, EVEN_K, UPCAST, INPUT_PRECISION)

    c_ptrs = c_ptr + rows_m.to(tl.int64)[:, None] * stride_cm + cols_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _dw_tile(pid, tokens_per_expert_ptr, M, N, K, E: tl.constexpr, E_POW2: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(expert, row_start, row_end, offs_k, offs_n, mask_k, mask_n) of weight-gradient program pid."""
    num_pid_k = tl.cdiv(K, BLOCK_K)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    tiles_per_expert = num_pid_k * num_pid_n
    # Expert-major order (the programs of one expert run together and share its rows in L2), with
    # experts visited largest first: under skewed routing the long-running tiles of a busy expert
    # start in the first wave instead of forming a tail (longest-processing-time-first).
    slot = pid // tiles_per_expert
    tile = pid % tiles_per_expert
    pid_k = tile // num_pid_n
    pid_n = tile % num_pid_n

    e_E, rows_E, row_end_E = _group_layout(tokens_per_expert_ptr, E, E_POW2)
    # rank_E[e] = number of experts ahead of e (more rows, or as many and a smaller index); an
    # E_POW2 x E_POW2 comparison in registers. Padding lanes (0 rows, index >= E) rank last.
    rows_i = rows_E[:, None]
    rows_j = rows_E[None, :]
    ahead_EE = (rows_j > rows_i) | ((rows_j == rows_i) & (e_E[None, :] < e_E[:, None]))
    rank_E = tl.sum(ahead_EE.to(tl.int32), 1)
    expert = tl.sum(tl.where(rank_E == slot, e_E, 0), 0)
    sel_E = e_E == expert
    row_end = _pick(row_end_E, sel_E)
    row_start = row_end - _pick(rows_E, sel_E)
    row_end = tl.minimum(row_end, M)

    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_k = offs_k < K
    mask_n = offs_n < N
    return expert, row_start, row_end, offs_k, offs_n, mask_k, mask_n


@triton.jit
def _load_rows_t(x_ptr, m0, offs_m, row_end, offs_k, mask_k, stride_xm, stride_xk):
    """x[m0 : m0 + BLOCK_M (< row_end), K-tile] transposed ([BLOCK_K, BLOCK_M]), its int64 row
    indices and row mask."""
    rows = m0 + offs_m
    mask_m = rows < row_end
    rows64 = rows.to(tl.int64)
    xt = tl.load(x_ptr + rows64[None, :] * stride_xm + offs_k[:, None] * stride_xk,
                 mask=mask_k[:, None] & mask_m[None, :], other=0.0)
    return xt, rows64, mask_m


@triton.jit(do_not_specialize=["M"])
def _grouped_mm_dw_kernel(
    x_ptr, dy_ptr, dw_ptr, tokens_per_expert_ptr,
    M, N, K,
    stride_xm, stride_xk,
    stride_dym, stride_dyn,
    stride_dwe, stride_dwk, stride_dwn,
    E: tl.constexpr, E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """dw[e] = x[rows of e].T @ dy[rows of e] for x [M, K], dy [M, N], dw [E, K, N]."""
    expert, row_start, row_end, offs_k, offs_n, mask_k, mask_n = _dw_tile(
        tl.program_id(0), tokens_per_expert_ptr, M, N, K, E, E_POW2, BLOCK_N, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)

    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    # Data-dependent trip count read from device memory: zero iterations for an empty expert,
    # which then stores exact zeros.
    for m0 in range(row_start, row_end, BLOCK_M):
        xt, rows64, mask_m = _load_rows_t(x_ptr, m0, offs_m, row_end, offs_k, mask_k, stride_xm, stride_xk)
        dy = tl.load(dy_ptr + rows64[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0)      # [BLOCK_M, BLOCK_N]
        if UPCAST:
            xt = xt.to(tl.float32)
            dy = dy.to(tl.float32)
        acc = tl.dot(xt, dy, acc, input_precision=INPUT_PRECISION)

    dw_ptrs = (dw_ptr + expert.to(tl.int64) * stride_dwe
               + offs_k[:, None] * stride_dwk + offs_n[None, :] * stride_dwn)
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=mask_k[:, None] & mask_n[None, :])


def _fwd_configs():
    # H100/A100-oriented tiles; 128x128/128x256 with BLOCK_K 64 are the usual winners for bf16 at
    # these widths, the smaller ones cover skinny N and the fp32 case (more registers per element).
    cfgs = []
    for bm, bn, bk, warps, stages in [
        (128, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 256, 64, 4, 4),
        (256, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 128, 32, 4, 4),
        (64, 64, 32, 4, 5),
    ]:
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                  num_warps=warps, num_stages=stages))
    return cfgs


def _dw_configs():
    cfgs = []
    for bm, bn, bk, warps, stages in [
        (64, 128, 128, 8, 3), (64, 128, 128, 4, 4), (64, 256, 128, 8, 3), (32, 128, 128, 4, 4),
        (64, 64, 64, 4, 4), (128, 128, 128, 8, 3), (32, 64, 64, 4, 5),
    ]:
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk},
                                  num_warps=warps, num_stages=stages))
    return cfgs


# Autotuning is keyed on the static dims only (N, K and, implicitly, dtypes): M changes every
# step under expert parallelism and must not trigger re-tuning. The weight strides are in the key
# because forward (w row-major) and dX (w transposed) can share (N, K) yet want different tiles.
_fwd_kernel_tuned = triton.autotune(configs=_fwd_configs(),
                                    key=["N", "K", "stride_bk", "stride_bn"])(_grouped_mm_kernel)
_dw_kernel_tuned = triton.autotune(configs=_dw_configs(), key=["N", "K"])(_grouped_mm_dw_kernel)

# Under the interpreter: one small fixed tile (16 is tl.dot's minimum), so CPU tests are quick.
_INTERPRET_META = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}


# ──────────────────────────────────────────────────────────────────────────────────────────────
# Layer 2: launchers and the autograd Function
# ──────────────────────────────────────────────────────────────────────────────────────────────

def _input_precision(dtype: torch.dtype) -> str:
    # fp32 follows PyTorch's own matmul setting (default "highest" -> exact IEEE fp32), so the
    # "triton" and "reference" backends agree by default. For fp16/bf16 the setting is unused by
    # Triton; keep its default ("tf32") as every standard Triton matmul does.
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    return _INTERPRET and dtype == torch.bfloat16


def launch_meta(E: int, dtype: torch.dtype) -> dict:
    """The constexprs every grouped kernel takes besides its tiles."""
    return dict(E=E, E_POW2=triton.next_power_of_2(E), UPCAST=_upcast(dtype), INPUT_PRECISION=_input_precision(dtype))


def row_block_grid(M: int, N: int, E: int):
    """grid(meta) over (virtual row-block, column-block): an upper bound on the row-blocks from
    shapes alone (each group adds at most one partial block), so no device->host read."""
    return lambda meta: ((triton.cdiv(M, meta["BLOCK_M"]) + E) * triton.cdiv(N, meta["BLOCK_N"]),)


def dw_grid(E: int, K: int, N: int):
    """grid(meta) of a weight-gradient kernel: one program per (expert, K-tile, N-tile)."""
    return lambda meta: (E * triton.cdiv(K, meta["BLOCK_K"]) * triton.cdiv(N, meta["BLOCK_N"]),)


def launch(kernel, tuned, grid, args, meta: dict, group_m: bool = True) -> None:
    """Run `tuned` (autotuned) on a GPU, or `kernel` with the fixed small tile under the interpreter."""
    if _INTERPRET:
        fixed = dict(_INTERPRET_META, GROUP_M=4) if group_m else _INTERPRET_META
        kernel[grid(fixed)](*args, **meta, **fixed)
    else:
        tuned[grid](*args, **meta)


def _launch_grouped_mm(a_MK: torch.Tensor, b_EKN: torch.Tensor,
                       tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """c_MN = grouped a_MK @ b_EKN; b may be any strided view (dX passes w transposed)."""
    M, K = a_MK.shape
    E, _, N = b_EKN.shape
    c_MN = torch.empty((M, N), dtype=a_MK.dtype, device=a_MK.device)
    if M == 0 or N == 0:
        return c_MN
    if K == 0:
        return c_MN.zero_()
    args = (a_MK, b_EKN, c_MN, tokens_per_expert_E, M, N, K,
            a_MK.stride(0), a_MK.stride(1),
            b_EKN.stride(0), b_EKN.stride(1), b_EKN.stride(2),
            c_MN.stride(0), c_MN.stride(1))
    launch(_grouped_mm_kernel, _fwd_kernel_tuned, row_block_grid(M, N, E), args, launch_meta(E, a_MK.dtype))
    return c_MN


def _launch_grouped_mm_dw(x_MK: torch.Tensor, dy_MN: torch.Tensor, tokens_per_expert_E: torch.Tensor,
                          num_experts: int, dw_dtype: torch.dtype) -> torch.Tensor:
    """dw_EKN[e] = x_MK[rows of e].T @ dy_MN[rows of e]; zero for empty experts."""
    M, K = x_MK.shape
    N = dy_MN.shape[1]
    E = num_experts
    dw_EKN = torch.empty((E, K, N), dtype=dw_dtype, device=x_MK.device)
    if E == 0 or K == 0 or N == 0:
        return dw_EKN
    if M == 0:
        return dw_EKN.zero_()
    args = (x_MK, dy_MN, dw_EKN, tokens_per_expert_E, M, N, K,
            x_MK.stride(0), x_MK.stride(1), dy_MN.stride(0), dy_MN.stride(1),
            dw_EKN.stride(0), dw_EKN.stride(1), dw_EKN.stride(2))
    launch(_grouped_mm_dw_kernel, _dw_kernel_tuned, dw_grid(E, K, N), args, launch_meta(E, x_MK.dtype),
           group_m=False)
    return dw_EKN


class GroupedGemmFunction(torch.autograd.Function):
    """Autograd wrapper around the Triton kernels (forward, dX, dW); no host sync anywhere."""

    @staticmethod
    def forward(ctx, x_MK, w_EKN, tokens_per_expert_E):
        ctx.save_for_backward(x_MK, w_EKN, tokens_per_expert_E)
        return _launch_grouped_mm(x_MK, w_EKN, tokens_per_expert_E)

    @staticmethod
    def backward(ctx, dy_MN):
        x_MK, w_EKN, tokens_per_expert_E = ctx.saved_tensors
        # A broadcast gradient (e.g. from y.sum()) has stride 0; make it a plain row-major matrix
        # so loads coalesce (a no-op for the usual contiguous gradient).
        dy_MN = dy_MN.contiguous()
        dx_MK = dw_EKN = None
        if ctx.needs_input_grad[0]:
            # dX = dY @ W[e]^T: the same kernel, weights as a transposed view (no copy).
            dx_MK = _launch_grouped_mm(dy_MN, w_EKN.transpose(1, 2), tokens_per_expert_E)
        if ctx.needs_input_grad[1]:
            dw_EKN = _launch_grouped_mm_dw(x_MK, dy_MN, tokens_per_expert_E,
                                           w_EKN.shape[0], w_EKN.dtype)
        return dx_MK, dw_EKN, None


def _torch_grouped_mm(x_MK: torch.Tensor, w_EKN: torch.Tensor,
                      tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """backend="torch": torch._grouped_mm with offsets = cumsum of the counts (int32, on device)."""
    if not hasattr(torch, "_grouped_mm"):
        raise RuntimeError(f"backend='torch' needs torch._grouped_mm, absent in torch "
                           f"{torch.__version__}; use backend='triton' or 'reference'.")
    if x_MK.is_cuda:
        # CUTLASS needs 16-byte aligned leading dimensions (PyTorch checks too, less readably).
        align = 16 // x_MK.element_size()
        K, N = w_EKN.shape[1], w_EKN.shape[2]
        if K % align or N % align:
            raise ValueError(f"backend='torch' on CUDA needs K and N to be multiples of {align} "
                             f"for {x_MK.dtype} (16-byte rows); got K={K}, N={N}.")
    # offs[e] = end row of expert e (PyTorch's convention), int32, computed on the device.
    offs_E = torch.cumsum(tokens_per_expert_E, 0).to(torch.int32)
    try:
        y_MN = torch._grouped_mm(x_MK, w_EKN, offs=offs_E)
    except RuntimeError as e:
        raise RuntimeError(f"backend='torch': torch._grouped_mm rejected x {tuple(x_MK.shape)} "
                           f"{x_MK.dtype} on {x_MK.device}, w {tuple(w_EKN.shape)} ({e}). Its fast "
                           f"path wants bf16 on sm90+; use backend='triton' otherwise.") from e
    if y_MN.requires_grad:
        # torch._grouped_mm's backward rejects a stride-0 (broadcast) gradient such as the one
        # y.sum() produces; hand it a contiguous one.
        y_MN.register_hook(lambda g: g.contiguous())
    return y_MN


# ──────────────────────────────────────────────────────────────────────────────────────────────
# Layer 3: plain-PyTorch reference
# ──────────────────────────────────────────────────────────────────────────────────────────────

def grouped_gemm_reference(x_MK: torch.Tensor, w_EKN: torch.Tensor,
                           tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """Loop of matmuls; differentiable by autograd. Syncs the host (reads the counts)."""
    sizes = [int(s) for s in tokens_per_expert_E.tolist()]
    if sum(sizes) != x_MK.shape[0]:
        raise ValueError(f"tokens_per_expert_E sums to {sum(sizes)}, x_MK has {x_MK.shape[0]} rows")
    outs = [x_rows @ w_EKN[e] for e, x_rows in enumerate(torch.split(x_MK, sizes, dim=0))]
    if not outs:
        return x_MK.new_zeros(0, w_EKN.shape[2])
    return torch.cat(outs, dim=0)


# ──────────────────────────────────────────────────────────────────────────────────────────────
# Dispatch
# ──────────────────────────────────────────────────────────────────────────────────────────────

def check_grouped_args(x_MK: torch.Tensor, w_EKN: torch.Tensor, tokens_per_expert_E: torch.Tensor,
                       backend: str) -> None:
    """Clear errors for arguments no backend can run (shapes, dtypes, devices)."""
    if x_MK.dim() != 2 or w_EKN.dim() != 3 or tokens_per_expert_E.dim() != 1:
        raise ValueError(f"expected x [M, K], w [E, K, N], counts [E]; got {tuple(x_MK.shape)}, "
                         f"{tuple(w_EKN.shape)}, {tuple(tokens_per_expert_E.shape)}")
    if x_MK.shape[1] != w_EKN.shape[1] or tokens_per_expert_E.shape[0] != w_EKN.shape[0]:
        raise ValueError(f"shape mismatch: x {tuple(x_MK.shape)}, w {tuple(w_EKN.shape)}, "
                         f"counts {tuple(tokens_per_expert_E.shape)}")
    if x_MK.dtype != w_EKN.dtype:
        raise ValueError(f"x and w must share a dtype, got {x_MK.dtype} and {w_EKN.dtype}")
    if tokens_per_expert_E.dtype.is_floating_point or tokens_per_expert_E.dtype == torch.bool:
        raise ValueError(f"tokens_per_expert_E must be an integer tensor, got {tokens_per_expert_E.dtype}")
    if backend == "triton":
        if x_MK.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"backend='triton' supports fp32/fp16/bf16, got {x_MK.dtype}")
        if not x_MK.is_cuda and not _INTERPRET:
            raise RuntimeError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set "
                               "before importing kernels.grouped_gemm, for CPU tests); "
                               "use backend='reference' on CPU.")
        if w_EKN.device != x_MK.device:
            raise ValueError(f"x on {x_MK.device} but w on {w_EKN.device}")


def grouped_gemm(x_MK: torch.Tensor, w_EKN: torch.Tensor, tokens_per_expert_E: torch.Tensor,
                 backend: str = "reference") -> torch.Tensor:
    """Grouped GEMM: ``y_MN[rows of e] = x_MK[rows of e] @ w_EKN[e]``, differentiable in x and w.

    Layout (what the dispatch code must hand in):
      * ``x_MK`` [M, K]: token rows already permuted into expert order — expert 0's rows first,
        then expert 1's, ... Row-major (contiguous) is fastest; any strides are accepted.
      * ``w_EKN`` [E, K, N]: one [in, out] matrix per expert, i.e. ``y = x @ w[e]`` (note: the
        transpose of nn.Linear's [out, in]). Under expert parallelism, E is the number of *local*
        experts and x holds only the rows routed to them.
      * ``tokens_per_expert_E`` [E]: integer (int32 or int64) row counts, summing to M; zeros are
        fine. Keep it on x's device: the triton/torch backends never read it on the host. (A CPU
        tensor is copied over for the triton backend.) The sum is *not* checked by the
        triton/torch backends (that would sync): rows past the sum are left uninitialised.

    Dtypes: x and w share one dtype, fp32, fp16 or bf16; accumulation is fp32; y has x's dtype;
    dX has x's dtype, dW has w's dtype. fp32 uses TF32 only if
    ``torch.get_float32_matmul_precision()`` allows it. Under autocast, cast x and w to the
    compute dtype yourself (e.g. ``w.to(x.dtype)``) before calling.

    Backends: ``"reference"`` (loop of matmuls, any device, syncs), ``"triton"`` (CUDA, or CPU
    under ``TRITON_INTERPRET=1``; no host sync), ``"torch"`` (``torch._grouped_mm``; on CUDA it
    needs K and N to be multiples of 16 bytes' worth of elements — 8 for bf16/fp16).

    Returns ``y_MN`` [M, N].
    """
    check_grouped_args(x_MK, w_EKN, tokens_per_expert_E, backend)
    if backend == "reference":
        return grouped_gemm_reference(x_MK, w_EKN, tokens_per_expert_E)
    if backend == "torch":
        return _torch_grouped_mm(x_MK, w_EKN, tokens_per_expert_E)
    if backend == "triton":
        tokens_per_expert_E = tokens_per_expert_E.to(x_MK.device, non_blocking=True)
        return GroupedGemmFunction.apply(x_MK, w_EKN, tokens_per_expert_E)
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
