"""Triton flash attention for the packed multimodal mask (the `"triton"` backend).

Reached through `kernels.attention.packed_attention(..., backend="triton")`, never directly.
This file holds the two upper layers of the kernel (DESIGN.md, rules of the house): the
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

Head dims: any multiple of 16 up to 128 (80 and 96 run padded to 128 with masked loads). Any T.
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
def _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt,
               ks_M, ke_M, start, stop, T, qk_scale,
               offs_d, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
               DOT_PREC: tl.constexpr):
    """Online-softmax accumulation over key tiles [start, stop) for one query tile."""
    d_ok = offs_d < HEAD_DIM
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kv_ok = (offs_n[:, None] < T) & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # [M, N], log2 units
        if MASKED:
            allowed = (offs_n[None, :] >= ks_M[:, None]) & (offs_n[None, :] < ke_M[:, None])
            s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


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
def _attn_fwd_kernel(Q, K, V, O, LSE, KV_START, KV_END,
                     stride_qb, stride_qh, stride_qt,
                     stride_kb, stride_kh, stride_kt,
                     stride_vb, stride_vh, stride_vt,
                     stride_ob, stride_oh, stride_ot,
                     H, T, qk_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    # Last query tiles first: under causal text they hold the most work, so the tail of the
    # launch is made of short programs (better SM load balance).
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < T
    d_ok = offs_d < HEAD_DIM

    ks_M = tl.load(KV_START + b * T + offs_m, mask=m_ok, other=0)
    ke_M = tl.load(KV_END + b * T + offs_m, mask=m_ok, other=0)
    # Rows past T must not widen the union nor shrink the intersection.
    lo_any = tl.min(tl.where(m_ok, ks_M, T), 0)
    hi_any = tl.max(tl.where(m_ok, ke_M, 0), 0)
    lo_all = tl.max(tl.where(m_ok, ks_M, 0), 0)
    hi_all = tl.min(tl.where(m_ok, ke_M, T), 0)
    first, full_lo, full_hi, last = _tile_plan(lo_any, hi_any, lo_all, hi_all, BLOCK_N)

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + NEG_BIG
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, ks_M, ke_M,
                               first, full_lo, T, qk_scale, offs_d, HEAD_DIM, BLOCK_N, True, DOT_PREC)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, ks_M, ke_M,
                               full_lo, full_hi, T, qk_scale, offs_d, HEAD_DIM, BLOCK_N, False, DOT_PREC)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, ks_M, ke_M,
                               full_hi, last, T, qk_scale, offs_d, HEAD_DIM, BLOCK_N, True, DOT_PREC)
    # Every valid row has >= 1 allowed key (itself), so l_i > 0 there; the guard keeps the
    # unstored rows past T finite.
    l_i = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_i[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + pid_bh * T + offs_m, m_i + tl.math.log2(l_i), mask=m_ok)


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_ot, stride_dob, stride_doh, stride_dot,
                      H, T, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta_i = sum_d dO_id * O_id, the row term of the softmax backward."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :], mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh * T + offs_m, delta, mask=offs_m < T)


@triton.jit
def _bwd_dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                    qs_N, qe_N, start, stop, T, qk_scale, offs_n, offs_d,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
                    DOT_PREC: tl.constexpr):
    """dK, dV of one key tile accumulated over query tiles [start, stop); works transposed
    ([keys, queries]) so the accumulators stay key-major."""
    d_ok = offs_d < HEAD_DIM
    for m0 in range(start, stop, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < T
        qT = tl.load(q_base + offs_m[None, :] * stride_qt + offs_d[:, None],
                     mask=m_ok[None, :] & d_ok[:, None], other=0.0)  # [D, M]
        do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :],
                     mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # [M, D]
        lse = tl.load(lse_base + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
        sT = tl.dot(k, qT, input_precision=DOT_PREC) * qk_scale  # [N, M]
        if MASKED:
            allowed = (offs_m[None, :] >= qs_N[:, None]) & (offs_m[None, :] < qe_N[:, None])
            sT = tl.where(allowed, sT, float("-inf"))
        pT = tl.math.exp2(sT - lse[None, :])
        dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # [N, M]
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, Q_START, Q_END,
                          stride_qb, stride_qh, stride_qt,
                          stride_kb, stride_kh, stride_kt,
                          stride_vb, stride_vh, stride_vt,
                          stride_dob, stride_doh, stride_dot,
                          H, T, qk_scale, sm_scale,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < T
    nd_ok = n_ok[:, None] & (offs_d[None, :] < HEAD_DIM)

    qs_N = tl.load(Q_START + b * T + offs_n, mask=n_ok, other=0)
    qe_N = tl.load(Q_END + b * T + offs_n, mask=n_ok, other=0)
    lo_any = tl.min(tl.where(n_ok, qs_N, T), 0)
    hi_any = tl.max(tl.where(n_ok, qe_N, 0), 0)
    lo_all = tl.max(tl.where(n_ok, qs_N, 0), 0)
    hi_all = tl.min(tl.where(n_ok, qe_N, T), 0)
    first, full_lo, full_hi, last = _tile_plan(lo_any, hi_any, lo_all, hi_all, BLOCK_M)

    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :], mask=nd_ok, other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :], mask=nd_ok, other=0.0)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    lse_base = LSE + pid_bh * T
    delta_base = DELTA + pid_bh * T
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dk, dv = _bwd_dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                             qs_N, qe_N, first, full_lo, T, qk_scale, offs_n, offs_d,
                             HEAD_DIM, BLOCK_M, True, DOT_PREC)
    dk, dv = _bwd_dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                             qs_N, qe_N, full_lo, full_hi, T, qk_scale, offs_n, offs_d,
                             HEAD_DIM, BLOCK_M, False, DOT_PREC)
    dk, dv = _bwd_dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                             qs_N, qe_N, full_hi, last, T, qk_scale, offs_n, offs_d,
                             HEAD_DIM, BLOCK_M, True, DOT_PREC)
    # dK, dV are contiguous [B, H, T, D] buffers allocated by the autograd Function.
    out_off = pid_bh * T * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=nd_ok)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=nd_ok)


@triton.jit
def _bwd_dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt,
                  ks_M, ke_M, start, stop, T, qk_scale, offs_d,
                  HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                  DOT_PREC: tl.constexpr):
    """dQ of one query tile accumulated over key tiles [start, stop)."""
    d_ok = offs_d < HEAD_DIM
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kv_ok = (offs_n[:, None] < T) & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        if MASKED:
            allowed = (offs_n[None, :] >= ks_M[:, None]) & (offs_n[None, :] < ke_M[:, None])
            s = tl.where(allowed, s, float("-inf"))
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, KV_START, KV_END,
                        stride_qb, stride_qh, stride_qt,
                        stride_kb, stride_kh, stride_kt,
                        stride_vb, stride_vh, stride_vt,
                        stride_dob, stride_doh, stride_dot,
                        H, T, qk_scale, sm_scale,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    # Last query tiles first: under causal text they hold the most work, so the tail of the
    # launch is made of short programs (better SM load balance).
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < T
    md_ok = m_ok[:, None] & (offs_d[None, :] < HEAD_DIM)

    ks_M = tl.load(KV_START + b * T + offs_m, mask=m_ok, other=0)
    ke_M = tl.load(KV_END + b * T + offs_m, mask=m_ok, other=0)
    lo_any = tl.min(tl.where(m_ok, ks_M, T), 0)
    hi_any = tl.max(tl.where(m_ok, ke_M, 0), 0)
    lo_all = tl.max(tl.where(m_ok, ks_M, 0), 0)
    hi_all = tl.min(tl.where(m_ok, ke_M, T), 0)
    first, full_lo, full_hi, last = _tile_plan(lo_any, hi_any, lo_all, hi_all, BLOCK_N)

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :], mask=md_ok, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :], mask=md_ok, other=0.0)
    lse = tl.load(LSE + pid_bh * T + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + pid_bh * T + offs_m, mask=m_ok, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _bwd_dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, ks_M, ke_M,
                       first, full_lo, T, qk_scale, offs_d, HEAD_DIM, BLOCK_N, True, DOT_PREC)
    dq = _bwd_dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, ks_M, ke_M,
                       full_lo, full_hi, T, qk_scale, offs_d, HEAD_DIM, BLOCK_N, False, DOT_PREC)
    dq = _bwd_dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, ks_M, ke_M,
                       full_hi, last, T, qk_scale, offs_d, HEAD_DIM, BLOCK_N, True, DOT_PREC)
    out_off = pid_bh * T * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DQ + out_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=md_ok)


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


def tile_config(q: torch.Tensor) -> TileConfig:
    if _tile_override is not None:
        return _tile_override
    if not q.is_cuda:
        return _CPU_TILES
    if q.dtype == torch.float32:
        return _GPU_TILES_FP32
    if torch.cuda.get_device_capability(q.device)[0] < 9:
        return _GPU_TILES_SM80
    return _GPU_TILES_D64 if q.shape[-1] <= 64 else _GPU_TILES_D128


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


def _check_head_dim(d: int) -> int:
    if d % 16 != 0 or not 16 <= d <= 128:
        raise ValueError(f"triton attention supports head dims that are multiples of 16 up to 128; got {d}")
    return triton.next_power_of_2(d)


def attn_forward(q, k, v, kv_start, kv_end, scale: float):
    """Launch the forward kernel; returns (o [B,H,T,D], lse [B,H,T] fp32 in log2 units)."""
    B, H, T, D = q.shape
    block_d = _check_head_dim(D)
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
        H, T, scale * LOG2E,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=cfg.fwd_m, BLOCK_N=cfg.fwd_n,
        DOT_PREC=_dot_precision(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return o, lse


def attn_backward(do, q, k, v, o, lse, ranges, scale: float):
    """Launch delta, dK/dV and dQ kernels; returns (dq, dk, dv) shaped and typed like q."""
    B, H, T, D = q.shape
    block_d = _check_head_dim(D)
    cfg = tile_config(q)
    prec = _dot_precision(q.dtype)
    kv_start, kv_end, q_start, q_end = ranges
    delta = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    _bwd_delta_kernel[(triton.cdiv(T, cfg.dq_m), B * H)](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
        H, T, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=cfg.dq_m, num_warps=cfg.bwd_warps)
    dq = torch.empty(B, H, T, D, device=q.device, dtype=q.dtype)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    common = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
              v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
              H, T, scale * LOG2E, scale)
    _attn_bwd_dkdv_kernel[(triton.cdiv(T, cfg.dkdv_n), B * H)](
        q, k, v, do, lse, delta, dk, dv, q_start, q_end, *common,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=cfg.dkdv_m, BLOCK_N=cfg.dkdv_n, DOT_PREC=prec,
        num_warps=cfg.bwd_warps, num_stages=cfg.bwd_stages)
    _attn_bwd_dq_kernel[(triton.cdiv(T, cfg.dq_m), B * H)](
        q, k, v, do, lse, delta, dq, kv_start, kv_end, *common,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=cfg.dq_m, BLOCK_N=cfg.dq_n, DOT_PREC=prec,
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
    _check_head_dim(q.shape[-1])
    r = [t.to(device=q.device, dtype=torch.int32).contiguous() for t in ranges]
    return PackedFlashAttention.apply(q, k, v, r[0], r[1], r[2], r[3], float(scale))
