"""Fused grouped SwiGLU up-projection: ``h_MH = silu(x_MD @ w1_EDH[e]) * (x_MD @ w3_EDH[e])``.

The first half of a SwiGLU expert in a dropless MoE (the second half, ``h @ w2``, is a plain
grouped GEMM, kernels/grouped_gemm.py). Unfused, it is two grouped GEMMs that each read ``x``,
write ``a = x @ w1`` and ``b = x @ w3`` in the compute dtype, then two element-wise kernels
(silu, multiply) that read them back. Here one program computes the same ``[BLOCK_M, BLOCK_N]``
tile of ``a`` and of ``b`` with two accumulators from one load of each ``x`` tile, and applies
SwiGLU in fp32 in the epilogue: ``x`` is read once, ``h`` is rounded once, and the element-wise
kernels are gone. The two weights stay separate tensors (the kernel reads both pointers), so the
MoE's parameters (``w1_EDH``, ``w3_EDH``) and its ``state_dict()`` are unchanged.

Backward (:class:`GroupedSwiGLUFunction`): the forward also stores ``a`` and ``b`` (rounded to the
compute dtype, as the unfused path saves them) when a gradient is needed; then
``dA = dh · b · silu'(a)``, ``dB = dh · silu(a)`` (fp32 element-wise, PyTorch), and two kernels:
``dX = dA @ w1ᵀ + dB @ w3ᵀ`` in one accumulator (no second [M, D] output to add), and
``dW1 = xᵀ dA``, ``dW3 = xᵀ dB`` per expert from one read of each ``x`` tile. No host sync.

Rows, groups and the grid follow kernels/grouped_gemm.py (rows sorted by expert, counts on the
device, a worst-case grid of virtual row-blocks, empty experts own no block).

Call it through ``grouped_swiglu(x, w1, w3, counts, backend=...)``; ``backend="reference"`` is the
plain-PyTorch composition (and what every other backend is tested against).

Tests: ``pytest tests/test_grouped_swiglu.py`` (CPU, TRITON_INTERPRET=1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import grouped_gemm as gg

__all__ = ["GroupedSwiGLUFunction", "grouped_swiglu", "grouped_swiglu_reference"]


# ──────────────────────────────────────────────────────────────────────────────────────────────
# Layer 1: Triton kernel
# ──────────────────────────────────────────────────────────────────────────────────────────────

@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit(do_not_specialize=["M"])
def _grouped_swiglu_kernel(
    x_ptr, w1_ptr, w3_ptr, h_ptr, a_ptr, b_ptr, tokens_per_expert_ptr,
    M, N, K,
    stride_xm, stride_xk,
    stride_we, stride_wk, stride_wn,
    stride_hm, stride_hn,
    E: tl.constexpr, E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, STORE_AB: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """h = silu(x @ w1[e]) * (x @ w3[e]) per expert group; w1, w3 share strides; a, b (the two
    products) are stored too when STORE_AB (they share h's strides)."""
    pid = tl.program_id(0)
    n_live, expert, rows_m, mask_m, cols_n, mask_n = gg._virtual_row_block(
        pid, tokens_per_expert_ptr, M, N, E, E_POW2, BLOCK_M, BLOCK_N, GROUP_M)
    if pid >= n_live:
        return
    offs_k = tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + rows_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_off = expert.to(tl.int64) * stride_we + offs_k[:, None] * stride_wk + cols_n[None, :] * stride_wn
    w1_ptrs = w1_ptr + w_off
    w3_ptrs = w3_ptr + w_off

    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
            w1 = tl.load(w1_ptrs, mask=mask_n[None, :], other=0.0)
            w3 = tl.load(w3_ptrs, mask=mask_n[None, :], other=0.0)
        else:
            k_left = K - k * BLOCK_K
            x = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
            w_mask = (offs_k[:, None] < k_left) & mask_n[None, :]
            w1 = tl.load(w1_ptrs, mask=w_mask, other=0.0)
            w3 = tl.load(w3_ptrs, mask=w_mask, other=0.0)
        if UPCAST:  # the CPU interpreter's bf16 tl.dot is wrong; fp32 there is exact enough
            x = x.to(tl.float32)
            w1 = w1.to(tl.float32)
            w3 = w3.to(tl.float32)
        acc1 = tl.dot(x, w1, acc1, input_precision=INPUT_PRECISION)
        acc3 = tl.dot(x, w3, acc3, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w1_ptrs += BLOCK_K * stride_wk
        w3_ptrs += BLOCK_K * stride_wk

    # Round to the output dtype first: the fp32 accumulators die before the stores.
    h = (acc1 * tl.sigmoid(acc1) * acc3).to(h_ptr.dtype.element_ty)
    if STORE_AB:
        a = acc1.to(a_ptr.dtype.element_ty)
        b = acc3.to(b_ptr.dtype.element_ty)
    out_off = rows_m.to(tl.int64)[:, None] * stride_hm + cols_n[None, :] * stride_hn
    out_mask = mask_m[:, None] & mask_n[None, :]
    tl.store(h_ptr + out_off, h, mask=out_mask)
    if STORE_AB:
        tl.store(a_ptr + out_off, a, mask=out_mask)
        tl.store(b_ptr + out_off, b, mask=out_mask)


@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit(do_not_specialize=["M"])
def _grouped_swiglu_dx_kernel(
    da_ptr, db_ptr, w1_ptr, w3_ptr, dx_ptr, tokens_per_expert_ptr,
    M, N, K,
    stride_gm, stride_gk,
    stride_we, stride_wk, stride_wn,
    stride_cm, stride_cn,
    E: tl.constexpr, E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """dx = dA @ w1[e]^T + dB @ w3[e]^T in one accumulator: dA, dB [M, K=H] share strides; w1, w3
    come as transposed views [E, K=H, N=D] sharing strides; dx [M, N]."""
    pid = tl.program_id(0)
    n_live, expert, rows_m, mask_m, cols_n, mask_n = gg._virtual_row_block(
        pid, tokens_per_expert_ptr, M, N, E, E_POW2, BLOCK_M, BLOCK_N, GROUP_M)
    if pid >= n_live:
        return
    offs_k = tl.arange(0, BLOCK_K)
    g_off = rows_m.to(tl.int64)[:, None] * stride_gm + offs_k[None, :] * stride_gk
    w_off = expert.to(tl.int64) * stride_we + offs_k[:, None] * stride_wk + cols_n[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = gg._accumulate_k(acc, da_ptr + g_off, w1_ptr + w_off, mask_m, mask_n, offs_k, K, stride_gk,
                           stride_wk, BLOCK_K, EVEN_K, UPCAST, INPUT_PRECISION)
    acc = gg._accumulate_k(acc, db_ptr + g_off, w3_ptr + w_off, mask_m, mask_n, offs_k, K, stride_gk,
                           stride_wk, BLOCK_K, EVEN_K, UPCAST, INPUT_PRECISION)
    c_ptrs = dx_ptr + rows_m.to(tl.int64)[:, None] * stride_cm + cols_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit(do_not_specialize=["M"])
def _grouped_swiglu_dw_kernel(
    x_ptr, da_ptr, db_ptr, dw1_ptr, dw3_ptr, tokens_per_expert_ptr,
    M, N, K,
    stride_xm, stride_xk,
    stride_gm, stride_gn,
    stride_dwe, stride_dwk, stride_dwn,
    E: tl.constexpr, E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """dw1[e] = x[rows of e]^T dA[rows of e] and dw3[e] = x^T dB from one read of each x tile;
    x [M, K=D], dA and dB [M, N=H] sharing strides, dw1 and dw3 [E, K, N] sharing strides."""
    expert, row_start, row_end, offs_k, offs_n, mask_k, mask_n = gg._dw_tile(
        tl.program_id(0), tokens_per_expert_ptr, M, N, K, E, E_POW2, BLOCK_N, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    acc1 = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    # Zero iterations for an empty expert, which then stores exact zeros.
    for m0 in range(row_start, row_end, BLOCK_M):
        xt, rows64, mask_m = gg._load_rows_t(x_ptr, m0, offs_m, row_end, offs_k, mask_k, stride_xm, stride_xk)
        g_off = rows64[:, None] * stride_gm + offs_n[None, :] * stride_gn
        g_mask = mask_m[:, None] & mask_n[None, :]
        da = tl.load(da_ptr + g_off, mask=g_mask, other=0.0)                 # [BLOCK_M, BLOCK_N]
        db = tl.load(db_ptr + g_off, mask=g_mask, other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
            da = da.to(tl.float32)
            db = db.to(tl.float32)
        acc1 = tl.dot(xt, da, acc1, input_precision=INPUT_PRECISION)
        acc3 = tl.dot(xt, db, acc3, input_precision=INPUT_PRECISION)
    dw_off = expert.to(tl.int64) * stride_dwe + offs_k[:, None] * stride_dwk + offs_n[None, :] * stride_dwn
    dw_mask = mask_k[:, None] & mask_n[None, :]
    tl.store(dw1_ptr + dw_off, acc1.to(dw1_ptr.dtype.element_ty), mask=dw_mask)
    tl.store(dw3_ptr + dw_off, acc3.to(dw3_ptr.dtype.element_ty), mask=dw_mask)


def _configs():
    # Two fp32 accumulators per program: at most 128x128 output tiles (the grouped GEMM's 128x256
    # would double the accumulator registers). Not tuned on a GPU yet.
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                          num_warps=warps, num_stages=stages)
            for bm, bn, bk, warps, stages in [
                (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 64, 8, 3), (128, 64, 64, 4, 4),
                (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (64, 64, 32, 4, 5)]]


_kernel_tuned = triton.autotune(configs=_configs(), key=["N", "K"])(_grouped_swiglu_kernel)
# dX has one accumulator: the grouped GEMM's own configs. dW has two: the grouped GEMM's dW
# configs whose two fp32 accumulators fit in 128 registers per thread (compiled for sm_90,
# 64x128x128 with 8 warps uses 173 registers and does not spill; with 4 warps it spills 1,104 B).
_dx_kernel_tuned = triton.autotune(configs=gg._fwd_configs(), key=["N", "K"])(_grouped_swiglu_dx_kernel)
_dw_kernel_tuned = triton.autotune(
    configs=[c for c in gg._dw_configs() if 2 * c.kwargs["BLOCK_K"] * c.kwargs["BLOCK_N"] <= 128 * 32 * c.num_warps],
    key=["N", "K"])(_grouped_swiglu_dw_kernel)


# ──────────────────────────────────────────────────────────────────────────────────────────────
# Layer 2: launcher and autograd Function
# ──────────────────────────────────────────────────────────────────────────────────────────────

def _launch(x_MK, w1_EKN, w3_EKN, tokens_per_expert_E, store_ab: bool):
    """(h, a, b) [M, N]; a and b are None unless store_ab."""
    M, K = x_MK.shape
    E, _, N = w1_EKN.shape
    h_MN = torch.empty((M, N), dtype=x_MK.dtype, device=x_MK.device)
    a_MN = torch.empty_like(h_MN) if store_ab else None
    b_MN = torch.empty_like(h_MN) if store_ab else None
    if M == 0 or N == 0:
        return h_MN, a_MN, b_MN
    if K == 0:  # silu(0) * 0
        return h_MN.zero_(), a_MN.zero_() if store_ab else None, b_MN.zero_() if store_ab else None
    if w3_EKN.stride() != w1_EKN.stride():
        w1_EKN, w3_EKN = w1_EKN.contiguous(), w3_EKN.contiguous()
    args = (x_MK, w1_EKN, w3_EKN, h_MN, a_MN if store_ab else h_MN, b_MN if store_ab else h_MN,
            tokens_per_expert_E, M, N, K, x_MK.stride(0), x_MK.stride(1),
            w1_EKN.stride(0), w1_EKN.stride(1), w1_EKN.stride(2), h_MN.stride(0), h_MN.stride(1))
    gg.launch(_grouped_swiglu_kernel, _kernel_tuned, gg.row_block_grid(M, N, E), args,
              dict(gg.launch_meta(E, x_MK.dtype), STORE_AB=store_ab))
    return h_MN, a_MN, b_MN


def swiglu_backward(dh_MN, a_MN, b_MN):
    """(dA, dB) of h = silu(a) * b, in fp32, cast to a's dtype."""
    a, b, dh = a_MN.float(), b_MN.float(), dh_MN.float()
    sig = torch.sigmoid(a)
    silu = a * sig
    dA = dh * b * (sig + silu * (1.0 - sig))
    dB = dh * silu
    return dA.to(a_MN.dtype), dB.to(a_MN.dtype)


def _launch_dx(dA_MH, dB_MH, w1_EDH, w3_EDH, tokens_per_expert_E):
    """dx_MD = dA @ w1[e]^T + dB @ w3[e]^T (one launch, one accumulator)."""
    M, H = dA_MH.shape
    E, D, _ = w1_EDH.shape
    dx_MD = torch.empty((M, D), dtype=dA_MH.dtype, device=dA_MH.device)
    if M == 0 or D == 0:
        return dx_MD
    if H == 0:
        return dx_MD.zero_()
    w1t, w3t = w1_EDH.transpose(1, 2), w3_EDH.transpose(1, 2)  # [E, H, D] views, no copy
    if w1t.stride() != w3t.stride():
        w1t, w3t = w1t.contiguous(), w3t.contiguous()
    args = (dA_MH, dB_MH, w1t, w3t, dx_MD, tokens_per_expert_E, M, D, H, dA_MH.stride(0), dA_MH.stride(1),
            w1t.stride(0), w1t.stride(1), w1t.stride(2), dx_MD.stride(0), dx_MD.stride(1))
    gg.launch(_grouped_swiglu_dx_kernel, _dx_kernel_tuned, gg.row_block_grid(M, D, E), args,
              gg.launch_meta(E, dA_MH.dtype))
    return dx_MD


def _launch_dw(x_MD, dA_MH, dB_MH, tokens_per_expert_E, num_experts: int, dtype: torch.dtype):
    """(dw1, dw3) [E, D, H] from one read of x; zero for empty experts."""
    M, D = x_MD.shape
    H = dA_MH.shape[1]
    E = num_experts
    dw1 = torch.empty((E, D, H), dtype=dtype, device=x_MD.device)
    dw3 = torch.empty_like(dw1)
    if E == 0 or D == 0 or H == 0:
        return dw1, dw3
    if M == 0:
        return dw1.zero_(), dw3.zero_()
    args = (x_MD, dA_MH, dB_MH, dw1, dw3, tokens_per_expert_E, M, H, D, x_MD.stride(0), x_MD.stride(1),
            dA_MH.stride(0), dA_MH.stride(1), dw1.stride(0), dw1.stride(1), dw1.stride(2))
    gg.launch(_grouped_swiglu_dw_kernel, _dw_kernel_tuned, gg.dw_grid(E, D, H), args,
              gg.launch_meta(E, x_MD.dtype), group_m=False)
    return dw1, dw3


class GroupedSwiGLUFunction(torch.autograd.Function):
    """Autograd wrapper: fused forward, backward through the grouped GEMM kernels."""

    @staticmethod
    def forward(ctx, x_MK, w1_EKN, w3_EKN, tokens_per_expert_E):
        need_grad = any(ctx.needs_input_grad[:3])
        h_MN, a_MN, b_MN = _launch(x_MK, w1_EKN, w3_EKN, tokens_per_expert_E, store_ab=need_grad)
        if need_grad:
            ctx.save_for_backward(x_MK, w1_EKN, w3_EKN, a_MN, b_MN, tokens_per_expert_E)
        return h_MN

    @staticmethod
    def backward(ctx, dh_MN):
        x_MK, w1_EKN, w3_EKN, a_MN, b_MN, counts_E = ctx.saved_tensors
        dA_MN, dB_MN = swiglu_backward(dh_MN, a_MN, b_MN)
        dx = dw1 = dw3 = None
        if ctx.needs_input_grad[0]:
            dx = _launch_dx(dA_MN, dB_MN, w1_EKN, w3_EKN, counts_E)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            dw1, dw3 = _launch_dw(x_MK, dA_MN, dB_MN, counts_E, w1_EKN.shape[0], w1_EKN.dtype)
        return dx, dw1 if ctx.needs_input_grad[1] else None, dw3 if ctx.needs_input_grad[2] else None, None


# ──────────────────────────────────────────────────────────────────────────────────────────────
# Layer 3: reference, and dispatch
# ──────────────────────────────────────────────────────────────────────────────────────────────

def grouped_swiglu_reference(x_MK, w1_EKN, w3_EKN, tokens_per_expert_E, backend: str = "reference"):
    """The unfused composition with grouped_gemm's `backend` (autograd does the backward)."""
    a = gg.grouped_gemm(x_MK, w1_EKN, tokens_per_expert_E, backend=backend)
    b = gg.grouped_gemm(x_MK, w3_EKN, tokens_per_expert_E, backend=backend)
    return F.silu(a) * b


def grouped_swiglu(x_MK: torch.Tensor, w1_EKN: torch.Tensor, w3_EKN: torch.Tensor,
                   tokens_per_expert_E: torch.Tensor, backend: str = "reference") -> torch.Tensor:
    """``silu(x @ w1[e]) * (x @ w3[e])`` over expert groups, differentiable in x, w1, w3.

    Layout and dtypes as ``kernels.grouped_gemm.grouped_gemm`` (w1 and w3 both [E, K, N]).
    ``backend="triton"`` runs the fused kernel (no host sync); ``"reference"`` and ``"torch"`` run
    the two grouped GEMMs of that backend and PyTorch's silu and multiply.
    """
    if w1_EKN.shape != w3_EKN.shape or w1_EKN.dtype != w3_EKN.dtype:
        raise ValueError(f"w1 {tuple(w1_EKN.shape)} {w1_EKN.dtype} and w3 {tuple(w3_EKN.shape)} "
                         f"{w3_EKN.dtype} must match")
    if backend != "triton":
        return grouped_swiglu_reference(x_MK, w1_EKN, w3_EKN, tokens_per_expert_E, backend)
    gg.check_grouped_args(x_MK, w1_EKN, tokens_per_expert_E, backend)
    tokens_per_expert_E = tokens_per_expert_E.to(x_MK.device, non_blocking=True)
    return GroupedSwiGLUFunction.apply(x_MK, w1_EKN, w3_EKN, tokens_per_expert_E)
