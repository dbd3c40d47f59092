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
``dA = dh · b · silu'(a)``, ``dB = dh · silu(a)`` (fp32 element-wise), ``dX = dA @ w1ᵀ + dB @ w3ᵀ``
and ``dW1 = xᵀ dA``, ``dW3 = xᵀ dB`` per expert with the grouped GEMM's own kernels (no host sync).
The backward still reads ``x`` once per weight gradient.

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
    n_live, expert, rows_m, mask_m, pid_n = gg._virtual_row_block(
        pid, tokens_per_expert_ptr, M, N, E, E_POW2, BLOCK_M, BLOCK_N, GROUP_M)
    if pid >= n_live:
        return
    cols_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols_n < N
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


def _configs():
    # Two fp32 accumulators per program: at most 128x128 output tiles (the grouped GEMM's 128x256
    # would double the accumulator registers). Not tuned on a GPU yet.
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                          num_warps=warps, num_stages=stages)
            for bm, bn, bk, warps, stages in [
                (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 64, 8, 3), (128, 64, 64, 4, 4),
                (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (64, 64, 32, 4, 5)]]


_kernel_tuned = triton.autotune(configs=_configs(), key=["N", "K"])(_grouped_swiglu_kernel)


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
    common = dict(E=E, E_POW2=triton.next_power_of_2(E), STORE_AB=store_ab,
                  UPCAST=gg._upcast(x_MK.dtype), INPUT_PRECISION=gg._input_precision(x_MK.dtype))

    def grid(meta):
        return ((triton.cdiv(M, meta["BLOCK_M"]) + E) * triton.cdiv(N, meta["BLOCK_N"]),)

    if gg._INTERPRET:
        meta = dict(gg._INTERPRET_META, GROUP_M=4)
        _grouped_swiglu_kernel[grid(meta)](*args, **common, **meta)
    else:
        _kernel_tuned[grid](*args, **common)
    return h_MN, a_MN, b_MN


def swiglu_backward(dh_MN, a_MN, b_MN):
    """(dA, dB) of h = silu(a) * b, in fp32, cast to a's dtype."""
    a, b, dh = a_MN.float(), b_MN.float(), dh_MN.float()
    sig = torch.sigmoid(a)
    silu = a * sig
    dA = dh * b * (sig + silu * (1.0 - sig))
    dB = dh * silu
    return dA.to(a_MN.dtype), dB.to(a_MN.dtype)


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
            dx = gg._launch_grouped_mm(dA_MN, w1_EKN.transpose(1, 2), counts_E)
            dx += gg._launch_grouped_mm(dB_MN, w3_EKN.transpose(1, 2), counts_E)
        E = w1_EKN.shape[0]
        if ctx.needs_input_grad[1]:
            dw1 = gg._launch_grouped_mm_dw(x_MK, dA_MN, counts_E, E, w1_EKN.dtype)
        if ctx.needs_input_grad[2]:
            dw3 = gg._launch_grouped_mm_dw(x_MK, dB_MN, counts_E, E, w3_EKN.dtype)
        return dx, dw1, dw3, None


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
