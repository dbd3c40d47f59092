"""Triton flash attention for the packed multimodal mask (the `"triton"` backend).

Reached through `kernels.attention.packed_attention(..., backend="triton")`, never directly.
This file holds the two upper layers of the kernel (docs/architecture.md, "Rules of the house"): the
`@triton.jit` kernels, and the `torch.autograd.Function` that launches them. The plain-PyTorch
reference of the same math is `kernels.attention.reference_attention`.

How the mask enters. Only the int32 ranges of `kernels.attention.AttentionRanges`: query `i`
sees keys `[kv_start[i], kv_end[i])`, key `j` is seen by queries `[q_start[j], q_end[j])`.
For a query tile the union of its rows' ranges is `[min kv_start, max kv_end)` and the
intersection is `[max kv_start, min kv_end)`. Key tiles outside the union are never visited; key
tiles inside the intersection are fully allowed and run without any mask arithmetic; only the
(at most a few) tiles at the two edges are masked. The backward pass over key tiles does the same
with the key-side ranges. Documents therefore cost only their own (block-diagonal) area, text
costs the causal half, and an image costs its square.

Forward: online softmax in fp32 (base-2 exponentials, scale folded into log2(e)); the
log-sum-exp of each row is saved. Backward: recomputes the scores from q, k and the LSE;
one kernel accumulates dK, dV per key tile (looping over query tiles), another dQ per query tile
(looping over key tiles). Every output element is written by exactly one program and summed in a
fixed order: deterministic, no atomics.

Head dims: any multiple of 16 up to 128. A head dim that is not a power of two runs as two
power-of-two column chunks (80 = 64 + 16, 96 = 64 + 32; `head_dim_chunks`): every dot over the
head dim becomes two accumulating dots and every [*, Dh] tile two tiles, so no matrix work is
spent on padding (padding 80 to 128 cost 60% more MMA work, 96 to 128 33%). Any T.
Dtypes: fp16, bf16, fp32 (fp32 uses IEEE dots, not TF32, so it can serve as a check).

Tests: `pytest tests/test_attention_triton.py` (CPU, TRITON_INTERPRET=1, small tiles).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# Initial running max: finite, so that a row with no allowed key in the first visited tiles gives
# exp2(-inf - NEG_BIG) = 0 instead of exp2(-inf - -inf) = NaN.
NEG_BIG = tl.constexpr(-1.0e30)


# ================================================================================================
# Layer 1: @triton.jit kernels
# ================================================================================================

@triton.jit
def _load_rows(base, offs_r, r_ok, stride_r, BLOCK_R: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, SPLIT_D: tl.constexpr):
    """A [rows, head dim] tile as two power-of-two column chunks [R, D0] and [R, D1]. Without a
    second chunk (SPLIT_D false) x1 is a zero placeholder that no dot ever reads."""
    d0 = tl.arange(0, BLOCK_D0)
    x0 = tl.load(base + offs_r[:, None] * stride_r + d0[None, :], mask=r_ok[:, None], other=0.0)
    if SPLIT_D:
        d1 = tl.arange(0, BLOCK_D1)
        x1 = tl.load(base + offs_r[:, None] * stride_r + BLOCK_D0 + d1[None, :],
                     mask=r_ok[:, None] & (d1[None, :] < HEAD_DIM - BLOCK_D0), other=0.0)
    else:
        x1 = tl.zeros([BLOCK_R, BLOCK_D1], dtype=base.dtype.element_ty)
    return x0, x1


@triton.jit
def _load_cols(base, offs_c, c_ok, stride_c, BLOCK_C: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, SPLIT_D: tl.constexpr):
    """The transposed tile: [D0, C] and [D1, C] (see `_load_rows`)."""
    d0 = tl.arange(0, BLOCK_D0)
    x0 = tl.load(base + offs_c[None, :] * stride_c + d0[:, None], mask=c_ok[None, :], other=0.0)
    if SPLIT_D:
        d1 = tl.arange(0, BLOCK_D1)
        x1 = tl.load(base + offs_c[None, :] * stride_c + BLOCK_D0 + d1[:, None],
                     mask=c_ok[None, :] & (d1[:, None] < HEAD_DIM - BLOCK_D0), other=0.0)
    else:
        x1 = tl.zeros([BLOCK_D1, BLOCK_C], dtype=base.dtype.element_ty)
    return x0, x1


@triton.jit
def _store_rows(base, x0, x1, offs_r, r_ok, stride_r, HEAD_DIM: tl.constexpr,
                BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, SPLIT_D: tl.constexpr):
    d0 = tl.arange(0, BLOCK_D0)
    tl.store(base + offs_r[:, None] * stride_r + d0[None, :], x0.to(base.dtype.element_ty), mask=r_ok[:, None])
    if SPLIT_D:
        d1 = tl.arange(0, BLOCK_D1)
        tl.store(base + offs_r[:, None] * stride_r + BLOCK_D0 + d1[None, :], x1.to(base.dtype.element_ty),
                 mask=r_ok[:, None] & (d1[None, :] < HEAD_DIM - BLOCK_D0))


@triton.jit
def _fwd_tiles(acc0, acc1, l_i, m_i, q0, q1, k_base, v_base, stride_kt, stride_vt,
               ks_M, ke_M, start, stop, T, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
               SPLIT_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
               DOT_PREC: tl.constexpr):
    """Online-softmax accumulation over key tiles [start, stop) for one query tile."""
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < T
        k0, k1 = _load_rows(k_base, offs_n, n_ok, stride_kt, BLOCK_N, HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D)
        v0, v1 = _load_rows(v_base, offs_n, n_ok, stride_vt, BLOCK_N, HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D)
        s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)
        if SPLIT_D:
            s = tl.dot(q1, tl.trans(k1), s, input_precision=DOT_PREC)
        s = s * qk_scale  # [M, N], log2 units
        if MASKED:
            allowed = (offs_n[None, :] >= ks_M[:, None]) & (offs_n[None, :] < ke_M[:, None])
            s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(v0.dtype)
        acc0 = acc0 * alpha[:, None] + tl.dot(p, v0, input_precision=DOT_PREC)
        if SPLIT_D:
            acc1 = acc1 * alpha[:, None] + tl.dot(p, v1, input_precision=DOT_PREC)
        m_i = m_new
    return acc0, acc1, l_i, m_i


@triton.jit
def _tile_plan(lo_any, hi_any, lo_all, hi_all, BLOCK: tl.constexpr):
    """Split the visited tiles of one program into [first, full_lo) masked, [full_lo, full_hi)
    unmasked, [full_hi, last) masked, from the union [lo_any, hi_any) and the intersection
    [lo_all, hi_all) of the rows' ranges."""
    first = (lo_any // BLOCK) * BLOCK
    last = tl.cdiv(hi_any, BLOCK) * BLOCK
    full_lo = tl.cdiv(lo_all, BLOCK) * BLOCK
    full_hi = (hi_all // BLOCK) * BLOCK
    none_full = full_hi <= full_lo
    # With no full tile, one masked sweep over everything.
    full_lo = tl.where(none_full, last, full_lo)
    full_hi = tl.where(none_full, last, full_hi)
    return first, full_lo, full_hi, last


@triton.jit
def _range_plan(START, END, b, offs, ok, T, BLOCK: tl.constexpr):
    """This program's rows' ranges and the tile plan over the other axis (see `_tile_plan`)."""
    s = tl.load(START + b * T + offs, mask=ok, other=0)
    e = tl.load(END + b * T + offs, mask=ok, other=0)
    # Rows past T must not widen the union nor shrink the intersection.
    lo_any = tl.min(tl.where(ok, s, T), 0)
    hi_any = tl.max(tl.where(ok, e, 0), 0)
    lo_all = tl.max(tl.where(ok, s, 0), 0)
    hi_all = tl.min(tl.where(ok, e, T), 0)
    first, full_lo, full_hi, last = _tile_plan(lo_any, hi_any, lo_all, hi_all, BLOCK)
    return s, e, first, full_lo, full_hi, last


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, KV_START, KV_END,
                     stride_qb, stride_qh, stride_qt,
                     stride_kb, stride_kh, stride_kt,
                     stride_vb, stride_vh, stride_vt,
                     stride_ob, stride_oh, stride_ot,
                     H, T, qk_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
                     SPLIT_D: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    # Last query tiles first: under causal text they hold the most work, so the tail of the
    # launch is made of short programs (better SM load balance).
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < T
    ks_M, ke_M, first, full_lo, full_hi, last = _range_plan(KV_START, KV_END, b, offs_m, m_ok, T, BLOCK_N)

    q0, q1 = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, m_ok, stride_qt,
                        BLOCK_M, HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    acc0 = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + NEG_BIG
    acc0, acc1, l_i, m_i = _fwd_tiles(acc0, acc1, l_i, m_i, q0, q1, k_base, v_base, stride_kt, stride_vt,
                                      ks_M, ke_M, first, full_lo, T, qk_scale,
                                      HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D, BLOCK_N, True, DOT_PREC)
    acc0, acc1, l_i, m_i = _fwd_tiles(acc0, acc1, l_i, m_i, q0, q1, k_base, v_base, stride_kt, stride_vt,
                                      ks_M, ke_M, full_lo, full_hi, T, qk_scale,
                                      HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D, BLOCK_N, False, DOT_PREC)
    acc0, acc1, l_i, m_i = _fwd_tiles(acc0, acc1, l_i, m_i, q0, q1, k_base, v_base, stride_kt, stride_vt,
                                      ks_M, ke_M, full_hi, last, T, qk_scale,
                                      HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D, BLOCK_N, True, DOT_PREC)
    # Every valid row has >= 1 allowed key (itself), so l_i > 0 there; the guard keeps the
    # unstored rows past T finite.
    l_i = tl.where(l_i > 0, l_i, 1.0)
    _store_rows(O + b * stride_ob + h * stride_oh, acc0 / l_i[:, None], acc1 / l_i[:, None],
                offs_m, m_ok, stride_ot, HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D)
    tl.store(LSE + pid_bh * T + offs_m, m_i + tl.math.log2(l_i), mask=m_ok)


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_ot, stride_dob, stride_doh, stride_dot,
                      H, T, HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
                      SPLIT_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta_i = sum_d dO_id * O_id, the row term of the softmax backward."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < T
    o0, o1 = _load_rows(O + b * stride_ob + h * stride_oh, offs_m, m_ok, stride_ot,
                        BLOCK_M, HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D)
    do0, do1 = _load_rows(DO + b * stride_dob + h * stride_doh, offs_m, m_ok, stride_dot,
                          BLOCK_M, HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D)
    delta = tl.sum(o0.to(tl.float32) * do0.to(tl.float32), 1)
    if SPLIT_D:
        delta += tl.sum(o1.to(tl.float32) * do1.to(tl.float32), 1)
    tl.store(DELTA + pid_bh * T + offs_m, delta, mask=m_ok)


@triton.jit
def _bwd_dkdv_tiles(dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_base, do_base, lse_base, delta_base,
                    stride_qt, stride_dot, qs_N, qe_N, start, stop, T, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
                    SPLIT_D: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
                    DOT_PREC: tl.constexpr):
    """dK, dV of one key tile accumulated over query tiles [start, stop); works transposed
    ([keys, queries]) so the accumulators stay key-major."""
    for m0 in range(start, stop, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < T
        qT0, qT1 = _load_cols(q_base, offs_m, m_ok, stride_qt, BLOCK_M, HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D)
        do0, do1 = _load_rows(do_base, offs_m, m_ok, stride_dot, BLOCK_M, HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D)
        lse = tl.load(lse_base + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
        sT = tl.dot(k0, qT0, input_precision=DOT_PREC)
        if SPLIT_D:
            sT = tl.dot(k1, qT1, sT, input_precision=DOT_PREC)
        sT = sT * qk_scale  # [N, M]
        if MASKED:
            allowed = (offs_m[None, :] >= qs_N[:, None]) & (offs_m[None, :] < qe_N[:, None])
            sT = tl.where(allowed, sT, float("-inf"))
        pT = tl.math.exp2(sT - lse[None, :])
        dv0 += tl.dot(pT.to(do0.dtype), do0, input_precision=DOT_PREC)
        dpT = tl.dot(v0, tl.trans(do0), input_precision=DOT_PREC)  # [N, M]
        if SPLIT_D:
            dv1 += tl.dot(pT.to(do1.dtype), do1, input_precision=DOT_PREC)
            dpT = tl.dot(v1, tl.trans(do1), dpT, input_precision=DOT_PREC)
        dsT = (pT * (dpT - delta[None, :])).to(qT0.dtype)
        dk0 += tl.dot(dsT, tl.trans(qT0), input_precision=DOT_PREC)
        if SPLIT_D:
            dk1 += tl.dot(dsT, tl.trans(qT1), input_precision=DOT_PREC)
    return dk0, dk1, dv0, dv1


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, Q_START, Q_END,
                          stride_qb, stride_qh, stride_qt,
                          stride_kb, stride_kh, stride_kt,
                          stride_vb, stride_vh, stride_vt,
                          stride_dob, stride_doh, stride_dot,
                          H, T, qk_scale, sm_scale,
                          HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
                          SPLIT_D: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < T
    qs_N, qe_N, first, full_lo, full_hi, last = _range_plan(Q_START, Q_END, b, offs_n, n_ok, T, BLOCK_M)

    k0, k1 = _load_rows(K + b * stride_kb + h * stride_kh, offs_n, n_ok, stride_kt,
                        BLOCK_N, HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D)
    v0, v1 = _load_rows(V + b * stride_vb + h * stride_vh, offs_n, n_ok, stride_vt,
                        BLOCK_N, HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    lse_base = LSE + pid_bh * T
    delta_base = DELTA + pid_bh * T
    dk0 = tl.zeros([BLOCK_N, BLOCK_D0], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, BLOCK_D0], dtype=tl.float32)
    dk1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)
    dv1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)
    dk0, dk1, dv0, dv1 = _bwd_dkdv_tiles(dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_base, do_base, lse_base,
                                         delta_base, stride_qt, stride_dot, qs_N, qe_N, first, full_lo, T,
                                         qk_scale, HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D, BLOCK_M, True,
                                         DOT_PREC)
    dk0, dk1, dv0, dv1 = _bwd_dkdv_tiles(dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_base, do_base, lse_base,
                                         delta_base, stride_qt, stride_dot, qs_N, qe_N, full_lo, full_hi, T,
                                         qk_scale, HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D, BLOCK_M, False,
                                         DOT_PREC)
    dk0, dk1, dv0, dv1 = _bwd_dkdv_tiles(dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_base, do_base, lse_base,
                                         delta_base, stride_qt, stride_dot, qs_N, qe_N, full_hi, last, T,
                                         qk_scale, HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D, BLOCK_M, True,
                                         DOT_PREC)
    # dK, dV are contiguous [B, H, T, D] buffers allocated by the autograd Function.
    out = pid_bh * T * HEAD_DIM
    _store_rows(DK + out, dk0 * sm_scale, dk1 * sm_scale, offs_n, n_ok, HEAD_DIM,
                HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D)
    _store_rows(DV + out, dv0, dv1, offs_n, n_ok, HEAD_DIM, HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D)


@triton.jit
def _bwd_dq_tiles(dq0, dq1, q0, q1, do0, do1, lse, delta, k_base, v_base, stride_kt, stride_vt,
                  ks_M, ke_M, start, stop, T, qk_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
                  SPLIT_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                  DOT_PREC: tl.constexpr):
    """dQ of one query tile accumulated over key tiles [start, stop)."""
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < T
        k0, k1 = _load_rows(k_base, offs_n, n_ok, stride_kt, BLOCK_N, HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D)
        v0, v1 = _load_rows(v_base, offs_n, n_ok, stride_vt, BLOCK_N, HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D)
        s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)
        dp = tl.dot(do0, tl.trans(v0), input_precision=DOT_PREC)
        if SPLIT_D:
            s = tl.dot(q1, tl.trans(k1), s, input_precision=DOT_PREC)
            dp = tl.dot(do1, tl.trans(v1), dp, input_precision=DOT_PREC)
        s = s * qk_scale
        if MASKED:
            allowed = (offs_n[None, :] >= ks_M[:, None]) & (offs_n[None, :] < ke_M[:, None])
            s = tl.where(allowed, s, float("-inf"))
        p = tl.math.exp2(s - lse[:, None])
        ds = (p * (dp - delta[:, None])).to(k0.dtype)
        dq0 += tl.dot(ds, k0, input_precision=DOT_PREC)
        if SPLIT_D:
            dq1 += tl.dot(ds, k1, input_precision=DOT_PREC)
    return dq0, dq1


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, KV_START, KV_END,
                        stride_qb, stride_qh, stride_qt,
                        stride_kb, stride_kh, stride_kt,
                        stride_vb, stride_vh, stride_vt,
                        stride_dob, stride_doh, stride_dot,
                        H, T, qk_scale, sm_scale,
                        HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
                        SPLIT_D: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    # Last query tiles first: under causal text they hold the most work, so the tail of the
    # launch is made of short programs (better SM load balance).
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < T
    ks_M, ke_M, first, full_lo, full_hi, last = _range_plan(KV_START, KV_END, b, offs_m, m_ok, T, BLOCK_N)

    q0, q1 = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, m_ok, stride_qt,
                        BLOCK_M, HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D)
    do0, do1 = _load_rows(DO + b * stride_dob + h * stride_doh, offs_m, m_ok, stride_dot,
                          BLOCK_M, HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D)
    lse = tl.load(LSE + pid_bh * T + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + pid_bh * T + offs_m, mask=m_ok, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    dq0 = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
    dq1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
    dq0, dq1 = _bwd_dq_tiles(dq0, dq1, q0, q1, do0, do1, lse, delta, k_base, v_base, stride_kt, stride_vt,
                             ks_M, ke_M, first, full_lo, T, qk_scale,
                             HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D, BLOCK_N, True, DOT_PREC)
    dq0, dq1 = _bwd_dq_tiles(dq0, dq1, q0, q1, do0, do1, lse, delta, k_base, v_base, stride_kt, stride_vt,
                             ks_M, ke_M, full_lo, full_hi, T, qk_scale,
                             HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D, BLOCK_N, False, DOT_PREC)
    dq0, dq1 = _bwd_dq_tiles(dq0, dq1, q0, q1, do0, do1, lse, delta, k_base, v_base, stride_kt, stride_vt,
                             ks_M, ke_M, full_hi, last, T, qk_scale,
                             HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D, BLOCK_N, True, DOT_PREC)
    _store_rows(DQ + pid_bh * T * HEAD_DIM, dq0 * sm_scale, dq1 * sm_scale, offs_m, m_ok, HEAD_DIM,
                HEAD_DIM, BLOCK_D0, BLOCK_D1, SPLIT_D)


# ================================================================================================
# Layer 2: launch configuration and the autograd Function
# ================================================================================================

class TileConfig:
    """Tile sizes and launch parameters of the three kernels (forward; dK/dV; dQ).

    `*_m` tiles queries, `*_n` tiles keys. The forward and dQ kernels own a query tile and loop
    over key tiles; the dK/dV kernel owns a key tile and loops over query tiles.
    """

    def __init__(self, fwd_m, fwd_n, dkdv_m, dkdv_n, dq_m, dq_n, num_warps=4, num_stages=2,
                 bwd_warps=4, bwd_stages=2):
        self.fwd_m, self.fwd_n = fwd_m, fwd_n
        self.dkdv_m, self.dkdv_n = dkdv_m, dkdv_n
        self.dq_m, self.dq_n = dq_m, dq_n
        self.num_warps, self.num_stages = num_warps, num_stages
        self.bwd_warps, self.bwd_stages = bwd_warps, bwd_stages

    def astuple(self):
        return (self.fwd_m, self.fwd_n, self.dkdv_m, self.dkdv_n, self.dq_m, self.dq_n,
                self.num_warps, self.num_stages, self.bwd_warps, self.bwd_stages)

    def __repr__(self):
        return f"TileConfig{self.astuple()}"


# GPU defaults for bf16/fp16. NOT yet timed on a GPU (none was available when they were set):
# chosen as the largest tiles that compile for sm_90a with no register spills (ptxas -v through
# kernels/attention_aot.py), in the usual flash-attention shape: 128-query tiles for forward and
# dQ, 128-key tiles for dK/dV. Re-tune with `tools/bench_attention.py --sweep-tiles`.
_GPU_TILES_D64 = TileConfig(128, 64, 64, 128, 128, 64, num_warps=8, num_stages=3, bwd_warps=8, bwd_stages=3)
_GPU_TILES_D128 = TileConfig(128, 64, 32, 128, 64, 64, num_warps=8, num_stages=3, bwd_warps=8, bwd_stages=2)
# Pre-Hopper GPUs (no wgmma; the configs above spill heavily when compiled for sm_80): smaller
# tiles, spill-free for Dh 64 and < 100 spilled bytes for Dh 128 on sm_80. Not timed either.
_GPU_TILES_SM80 = TileConfig(64, 64, 32, 64, 64, 64, num_warps=8, num_stages=2, bwd_warps=8, bwd_stages=2)
# fp32 uses IEEE dots (a correctness path, not a fast one): small tiles keep it compilable.
_GPU_TILES_FP32 = TileConfig(32, 32, 32, 32, 32, 32, num_warps=4, num_stages=1, bwd_warps=4, bwd_stages=1)
# CPU (interpreter): 16-wide tiles so that tiny test shapes cover many tiles, partial tiles and
# all three tile classes.
_CPU_TILES = TileConfig(16, 16, 16, 16, 16, 16, num_warps=1, num_stages=1, bwd_warps=1, bwd_stages=1)
_tile_override: TileConfig | None = None


def set_tile_config(cfg: TileConfig | None) -> None:
    """Force tile sizes (tests and tuning sweeps); None restores the defaults."""
    global _tile_override
    _tile_override = cfg


def gpu_tile_config(head_dim: int, dtype: torch.dtype, sm_major: int) -> TileConfig:
    """The default tiles on a GPU of compute capability `sm_major`.x (also what
    kernels/attention_aot.py compiles)."""
    if dtype == torch.float32:
        return _GPU_TILES_FP32
    if sm_major < 9:
        return _GPU_TILES_SM80
    return _GPU_TILES_D64 if head_dim <= 64 else _GPU_TILES_D128


def tile_config(q: torch.Tensor) -> TileConfig:
    if _tile_override is not None:
        return _tile_override
    if not q.is_cuda:
        return _CPU_TILES
    return gpu_tile_config(q.shape[-1], q.dtype, torch.cuda.get_device_capability(q.device)[0])


def tile_schedule(starts_BT: torch.Tensor, ends_BT: torch.Tensor, block_rows: int, block_cols: int, T: int):
    """Host-side mirror of `_tile_plan`: which column tiles each row tile visits and which of
    those it runs unmasked. For the forward/dQ pass pass (kv_start, kv_end, BLOCK_M, BLOCK_N); for
    dK/dV pass (q_start, q_end, BLOCK_N, BLOCK_M). Returns bool `[B, row tiles, col tiles]`
    (visited, full). Used by tests (tile skipping) and the benchmark (work actually done)."""
    B = starts_BT.shape[0]
    n_r, n_c = triton.cdiv(T, block_rows), triton.cdiv(T, block_cols)
    pad = n_r * block_rows - T
    s = torch.nn.functional.pad(starts_BT.long(), (0, pad), value=-1).view(B, n_r, block_rows)
    e = torch.nn.functional.pad(ends_BT.long(), (0, pad), value=-1).view(B, n_r, block_rows)
    ok = torch.arange(n_r * block_rows, device=s.device).view(n_r, block_rows) < T
    lo_any = torch.where(ok, s, T).amin(-1)
    hi_any = torch.where(ok, e, 0).amax(-1)
    lo_all = torch.where(ok, s, 0).amax(-1)
    hi_all = torch.where(ok, e, T).amin(-1)
    c0 = torch.arange(n_c, device=s.device) * block_cols  # [C]
    first = (lo_any // block_cols * block_cols)[..., None]
    last = ((hi_any + block_cols - 1) // block_cols * block_cols)[..., None]
    full_lo = ((lo_all + block_cols - 1) // block_cols * block_cols)[..., None]
    full_hi = (hi_all // block_cols * block_cols)[..., None]
    visited = (c0 >= first) & (c0 < last)
    full = (c0 >= full_lo) & (c0 < full_hi) & (full_hi > full_lo)
    return visited, full


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact IEEE products (TF32 would make the fp32 path useless as a check).
    return "ieee" if dtype == torch.float32 else "tf32"


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def head_dim_chunks(d: int) -> dict:
    """The head-dim constexprs of the kernels: `d` as a power-of-two chunk `BLOCK_D0` (the largest
    <= d) plus, when d is not a power of two, a second chunk `BLOCK_D1` (the rest rounded up to a
    power of two). 80 = 64 + 16 and 96 = 64 + 32 run with no padding; only 112 = 64 + 64 pads
    (16 columns, the same as padding it to 128)."""
    if d % 16 != 0 or not 16 <= d <= 128:
        raise ValueError(f"triton attention supports head dims that are multiples of 16 up to 128; got {d}")
    d0 = 1 << (d.bit_length() - 1)
    split = d > d0
    # Without a split the second chunk is a 16-wide placeholder no dot reads (Triton tensors
    # cannot be empty).
    d1 = triton.next_power_of_2(d - d0) if split else 16
    return dict(HEAD_DIM=d, BLOCK_D0=d0, BLOCK_D1=max(d1, 16), SPLIT_D=split)


def padded_head_dim(d: int) -> int:
    """Columns the kernels' dots actually process for head dim `d` (= d except for 112)."""
    c = head_dim_chunks(d)
    return c["BLOCK_D0"] + (c["BLOCK_D1"] if c["SPLIT_D"] else 0)


def attn_forward(q, k, v, kv_start, kv_end, scale: float):
    """Launch the forward kernel; returns (o [B,H,T,D], lse [B,H,T] fp32 in log2 units)."""
    B, H, T, D = q.shape
    dims = head_dim_chunks(D)
    cfg = tile_config(q)
    o = torch.empty(B, H, T, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(T, cfg.fwd_m), B * H)
    _attn_fwd_kernel[grid](
        q, k, v, o, lse, kv_start, kv_end,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        H, T, scale * LOG2E, **dims, BLOCK_M=cfg.fwd_m, BLOCK_N=cfg.fwd_n,
        DOT_PREC=_dot_precision(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return o, lse


def attn_backward(do, q, k, v, o, lse, ranges, scale: float):
    """Launch delta, dK/dV and dQ kernels; returns (dq, dk, dv) shaped and typed like q."""
    B, H, T, D = q.shape
    dims = head_dim_chunks(D)
    cfg = tile_config(q)
    prec = _dot_precision(q.dtype)
    kv_start, kv_end, q_start, q_end = ranges
    delta = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    _bwd_delta_kernel[(triton.cdiv(T, cfg.dq_m), B * H)](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
        H, T, **dims, BLOCK_M=cfg.dq_m, num_warps=cfg.bwd_warps)
    dq = torch.empty(B, H, T, D, device=q.device, dtype=q.dtype)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    common = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
              v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
              H, T, scale * LOG2E, scale)
    _attn_bwd_dkdv_kernel[(triton.cdiv(T, cfg.dkdv_n), B * H)](
        q, k, v, do, lse, delta, dk, dv, q_start, q_end, *common,
        **dims, BLOCK_M=cfg.dkdv_m, BLOCK_N=cfg.dkdv_n, DOT_PREC=prec,
        num_warps=cfg.bwd_warps, num_stages=cfg.bwd_stages)
    _attn_bwd_dq_kernel[(triton.cdiv(T, cfg.dq_m), B * H)](
        q, k, v, do, lse, delta, dq, kv_start, kv_end, *common,
        **dims, BLOCK_M=cfg.dq_m, BLOCK_N=cfg.dq_n, DOT_PREC=prec,
        num_warps=cfg.bwd_warps, num_stages=cfg.bwd_stages)
    return dq, dk, dv


class PackedFlashAttention(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, o, the LSE and the ranges; no [T, T] tensor is stored."""

    @staticmethod
    def forward(ctx, q, k, v, kv_start, kv_end, q_start, q_end, scale):
        q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
        o, lse = attn_forward(q, k, v, kv_start, kv_end, scale)
        ctx.save_for_backward(q, k, v, o, lse, kv_start, kv_end, q_start, q_end)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, kv_start, kv_end, q_start, q_end = ctx.saved_tensors
        do = _last_dim_contiguous(do)
        dq, dk, dv = attn_backward(do, q, k, v, o, lse, (kv_start, kv_end, q_start, q_end), ctx.scale)
        return dq, dk, dv, None, None, None, None, None


def triton_packed_attention(q, k, v, ranges, scale: float):
    """Entry point used by `kernels.attention.packed_attention(backend="triton")`."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"triton attention supports fp16, bf16, fp32; got {q.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    head_dim_chunks(q.shape[-1])
    r = [t.to(device=q.device, dtype=torch.int32).contiguous() for t in ranges]
    return PackedFlashAttention.apply(q, k, v, r[0], r[1], r[2], r[3], float(scale))
