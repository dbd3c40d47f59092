"""Exact attention under the packed multimodal mask: ranges, reference, and backend dispatch.

The mask (docs/architecture.md, "The attention mask"): for query `i` and key `j` of one row,

    allowed(i, j) = doc[i] == doc[j] and (j <= i or (img[i] >= 0 and img[i] == img[j]))

text is causal, the patches of one image see each other bidirectionally plus everything
earlier in their document, and no token sees another document. Documents and images are
contiguous, so the mask is two int32 ranges per token (`AttentionRanges`), computed once per
batch by `attention_ranges` and shared by every layer.

Models call only `packed_attention(q, k, v, doc_ids, image_ids, backend=...)`:

    backend      device   what runs
    reference    any      dense bool mask + torch SDPA (autograd; the CPU path and the oracle)
    triton       CUDA     our flash kernel (kernels/attention_triton.py); CPU under TRITON_INTERPRET=1
    flex         CUDA     torch FlexAttention with a block mask built from the same ranges
    flash_attn   CUDA     flash-attn varlen causal; text-only batches; optional dependency
    auto         any      triton on CUDA (head dim a multiple of 16 up to 128), reference elsewhere

Files of this kernel: this module holds the ranges, the plain-PyTorch reference and the
dispatch; kernels/attention_triton.py the `@triton.jit` kernels and their autograd Function
(imported lazily, so the model never needs a GPU toolchain to import this);
kernels/attention_layouts.py the test/benchmark row layouts; kernels/attention_aot.py an
ahead-of-time compile check for GPU targets. Benchmark: tools/bench_attention.py (GPU).

`auto` does not pick flash_attn for text-only batches: knowing a batch is text-only costs a host
sync, and flash-attn is an optional dependency; revisit with the benchmark's numbers.

Tests: `pytest tests/test_attention_mask.py tests/test_attention_triton.py`.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "reference", "triton", "flex", "flash_attn")


class AttentionRanges(NamedTuple):
    """The mask as ranges; all int32 `[B, T]`, on the device of the layout.

    Query `i` may attend keys `[kv_start[i], kv_end[i])`; key `j` is attended by queries
    `[q_start[j], q_end[j])`. Both ranges are never empty (a token always sees itself).
    """
    kv_start: torch.Tensor
    kv_end: torch.Tensor
    q_start: torch.Tensor
    q_end: torch.Tensor


def _run_bounds(new_run_BT: torch.Tensor, last_of_run_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Start and end (exclusive) of the contiguous run each token belongs to, by prefix scans."""
    B, T = new_run_BT.shape
    idx_BT = torch.arange(T, device=new_run_BT.device, dtype=torch.int64).expand(B, T)
    start_BT = torch.where(new_run_BT, idx_BT, torch.zeros_like(idx_BT)).cummax(dim=1).values
    # Scan from the right: the nearest run end at or after each token.
    end_rev_BT = torch.where(last_of_run_BT, idx_BT + 1, torch.full_like(idx_BT, T)).flip(1)
    end_BT = end_rev_BT.cummin(dim=1).values.flip(1)
    return start_BT, end_BT


def attention_ranges(doc_ids_BT: torch.Tensor, image_ids_BT: torch.Tensor) -> AttentionRanges:
    """The per-token key and query ranges of the packed mask (vectorised; no loop over tokens).

    Relies on the `PackedBatch` contract: a document's tokens, and an image's patches, are
    contiguous in their row, and an image lies inside one document.
    """
    if doc_ids_BT.shape != image_ids_BT.shape or doc_ids_BT.dim() != 2:
        raise ValueError(f"doc_ids {tuple(doc_ids_BT.shape)} and image_ids {tuple(image_ids_BT.shape)} "
                         "must both be [B, T]")
    B, T = doc_ids_BT.shape
    dev = doc_ids_BT.device
    doc_BT = doc_ids_BT.long()
    img_BT = image_ids_BT.long()
    changed_doc_BT1 = doc_BT[:, 1:] != doc_BT[:, :-1]  # [B, T-1]: token t+1 opens a new document
    # An image run breaks at a document boundary too, so an image id reused by a later document
    # (not allowed by the contract, but cheap to guard) never spans two documents.
    changed_img_BT1 = changed_doc_BT1 | (img_BT[:, 1:] != img_BT[:, :-1])
    true_B1 = torch.ones(B, 1, dtype=torch.bool, device=dev)
    doc_start_BT, doc_end_BT = _run_bounds(torch.cat([true_B1, changed_doc_BT1], 1),
                                           torch.cat([changed_doc_BT1, true_B1], 1))
    img_start_BT, img_end_BT = _run_bounds(torch.cat([true_B1, changed_img_BT1], 1),
                                           torch.cat([changed_img_BT1, true_B1], 1))
    idx_BT = torch.arange(T, device=dev, dtype=torch.int64).expand(B, T)
    is_patch_BT = img_BT >= 0
    kv_end_BT = torch.where(is_patch_BT, img_end_BT, idx_BT + 1)
    q_start_BT = torch.where(is_patch_BT, img_start_BT, idx_BT)
    i32 = torch.int32
    return AttentionRanges(doc_start_BT.to(i32).contiguous(), kv_end_BT.to(i32).contiguous(),
                           q_start_BT.to(i32).contiguous(), doc_end_BT.to(i32).contiguous())


def dense_mask(doc_ids_BT: torch.Tensor, image_ids_BT: torch.Tensor) -> torch.Tensor:
    """bool `[B, T, T]` (query, key): the mask rule evaluated element-wise, O(T^2) memory."""
    T = doc_ids_BT.shape[1]
    idx_T = torch.arange(T, device=doc_ids_BT.device)
    same_doc_BTT = doc_ids_BT[:, :, None] == doc_ids_BT[:, None, :]
    causal_TT = idx_T[None, :] <= idx_T[:, None]
    img_q_BT1 = image_ids_BT[:, :, None]
    same_img_BTT = (img_q_BT1 >= 0) & (img_q_BT1 == image_ids_BT[:, None, :])
    return same_doc_BTT & (causal_TT[None] | same_img_BTT)


def mask_from_ranges(ranges: AttentionRanges, by: str = "query") -> torch.Tensor:
    """bool `[B, T, T]` (query, key) rebuilt from the query-side or the key-side ranges (tests)."""
    T = ranges.kv_start.shape[1]
    idx_T = torch.arange(T, device=ranges.kv_start.device)
    if by == "query":
        j_11T = idx_T[None, None, :]
        return (j_11T >= ranges.kv_start[:, :, None]) & (j_11T < ranges.kv_end[:, :, None])
    if by == "key":
        i_1T1 = idx_T[None, :, None]
        return (i_1T1 >= ranges.q_start[:, None, :]) & (i_1T1 < ranges.q_end[:, None, :])
    raise ValueError(f"by={by!r}: expected 'query' or 'key'")


# --- reference -----------------------------------------------------------------------------------

def reference_attention(q_BHTD, k_BHTD, v_BHTD, doc_ids_BT, image_ids_BT, scale=None):
    """Dense-mask SDPA: the oracle every other backend is tested against; supports autograd."""
    mask_B1TT = dense_mask(doc_ids_BT, image_ids_BT)[:, None]
    return F.scaled_dot_product_attention(q_BHTD, k_BHTD, v_BHTD, attn_mask=mask_B1TT, scale=scale)


# --- dispatch --------------------------------------------------------------------------------------

def _check_shapes(q, k, v, doc_ids, image_ids):
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one [B, H, T, Dh] shape; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, _, T, _ = q.shape
    if tuple(doc_ids.shape) != (B, T) or tuple(image_ids.shape) != (B, T):
        raise ValueError(f"doc_ids/image_ids must be [B, T] = {(B, T)}; got {tuple(doc_ids.shape)}, "
                         f"{tuple(image_ids.shape)}")


def _triton_usable(x: torch.Tensor) -> bool:
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, q: torch.Tensor, image_ids_BT: torch.Tensor | None = None) -> str:
    """The concrete backend `packed_attention` will run for `backend` on these inputs."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
    if backend != "auto":
        return backend
    d = q.shape[-1]
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16, torch.float32) and d % 16 == 0 and d <= 128:
        # Our kernel is the default on GPU. flash-attn is not chosen automatically: it is valid
        # only for text-only batches (finding out costs a host sync) and is optional; compare
        # with tools/bench_attention.py on a GPU before changing this.
        return "triton"
    return "reference"


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     doc_ids: torch.Tensor, image_ids: torch.Tensor,
                     backend: str = "auto", scale: float | None = None,
                     ranges: AttentionRanges | None = None) -> torch.Tensor:
    """Attention of `q, k, v` `[B, H, T, Dh]` under the packed mask; returns `[B, H, T, Dh]`.

    `doc_ids`, `image_ids`: int32 `[B, T]` (PackedBatch). `scale` defaults to `Dh ** -0.5`.
    `ranges`: `attention_ranges(doc_ids, image_ids)` computed once per batch and passed to every
    layer (recomputed here when absent). QK-Norm and RoPE are the caller's business.
    """
    _check_shapes(q, k, v, doc_ids, image_ids)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    backend = resolve_backend(backend, q, image_ids)
    if backend == "reference":
        return reference_attention(q, k, v, doc_ids, image_ids, scale=scale)
    if ranges is None:
        ranges = attention_ranges(doc_ids, image_ids)
    if backend == "triton":
        if not _triton_usable(q):
            raise RuntimeError("attention backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 "
                               "set before importing kernels, for CPU tests); use backend='reference' on CPU")
        from kernels.attention_triton import triton_packed_attention
        return triton_packed_attention(q, k, v, ranges, scale)
    if backend == "flex":
        return flex_attention_packed(q, k, v, doc_ids, image_ids, ranges, scale)
    if backend == "flash_attn":
        return flash_attn_varlen_packed(q, k, v, doc_ids, image_ids, ranges, scale)
    raise AssertionError(backend)


# --- flex ------------------------------------------------------------------------------------------

def flex_block_mask(doc_ids_BT, image_ids_BT, ranges: AttentionRanges | None = None, block_size: int = 128):
    """A FlexAttention BlockMask whose `mask_mod` reads the same int32 ranges as our kernel."""
    from torch.nn.attention.flex_attention import create_block_mask
    if ranges is None:
        ranges = attention_ranges(doc_ids_BT, image_ids_BT)
    kv_start_BT, kv_end_BT = ranges.kv_start, ranges.kv_end
    B, T = doc_ids_BT.shape

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx >= kv_start_BT[b, q_idx]) & (kv_idx < kv_end_BT[b, q_idx])

    return create_block_mask(mask_mod, B, None, T, T, device=doc_ids_BT.device, BLOCK_SIZE=block_size)


_compiled_flex = None
# One-entry cache: the block mask of the last batch, keyed on the identity of its ranges tensor, so
# that the layers of one forward pass (which share `ranges`) build it once, not once per layer.
_flex_mask_cache: tuple | None = None


def flex_attention_packed(q, k, v, doc_ids_BT, image_ids_BT, ranges=None, scale=None, block_mask=None):
    """FlexAttention under the packed mask (GPU only: it has no backward on CPU).

    Uses `block_mask` when given (from `flex_block_mask`; the benchmark does this so that only the
    attention is timed); else the block mask of `ranges`, built once per `ranges` object.
    """
    global _compiled_flex, _flex_mask_cache
    if not q.is_cuda:
        raise RuntimeError("attention backend 'flex' runs on CUDA only (FlexAttention has no CPU "
                           "backward); use backend='reference' on CPU")
    from torch.nn.attention.flex_attention import flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    if block_mask is None:
        if ranges is None:
            ranges = attention_ranges(doc_ids_BT, image_ids_BT)
        if _flex_mask_cache is not None and _flex_mask_cache[0] is ranges.kv_start:
            block_mask = _flex_mask_cache[1]
        else:
            block_mask = flex_block_mask(doc_ids_BT, image_ids_BT, ranges)
            _flex_mask_cache = (ranges.kv_start, block_mask)
    return _compiled_flex(q, k, v, block_mask=block_mask, scale=scale)


# --- flash-attn varlen (text-only) -----------------------------------------------------------------

_varlen_cache: tuple | None = None  # (ranges.kv_start, has_image, cu_seqlens) of the last batch

def varlen_cu_seqlens(doc_ids_BT: torch.Tensor) -> tuple[torch.Tensor, int]:
    """int32 cumulative document lengths over the flattened batch, and the longest document.

    Documents are the runs of equal `doc_ids` in each row; rows never share a document.
    """
    B, T = doc_ids_BT.shape
    new_BT = torch.ones(B, T, dtype=torch.bool, device=doc_ids_BT.device)
    new_BT[:, 1:] = doc_ids_BT[:, 1:] != doc_ids_BT[:, :-1]
    starts_N = torch.nonzero(new_BT.reshape(-1), as_tuple=False).flatten()
    cu_N1 = torch.cat([starts_N, torch.tensor([B * T], device=starts_N.device)]).to(torch.int32)
    max_len = int((cu_N1[1:] - cu_N1[:-1]).max())  # host sync: flash-attn wants a Python int
    return cu_N1, max_len


def flash_attn_varlen_packed(q, k, v, doc_ids_BT, image_ids_BT, ranges=None, scale=None, cu_seqlens=None):
    """flash-attn's varlen causal kernel, one sequence per document. Text-only batches only:
    flash-attn cannot express the bidirectional image spans, so an image is an error, not a
    silently wrong mask. `cu_seqlens` (from `varlen_cu_seqlens`) may be precomputed; the caller
    then vouches that the batch is text-only."""
    global _varlen_cache
    B, H, T, D = q.shape
    if cu_seqlens is None:
        # The image check and cu_seqlens each sync with the host: do them once per `ranges`
        # object (i.e. once per batch), not once per layer.
        if ranges is not None and _varlen_cache is not None and _varlen_cache[0] is ranges.kv_start:
            has_image, cu_seqlens = _varlen_cache[1:]
        else:
            has_image = bool((image_ids_BT >= 0).any())
            cu_seqlens = None if has_image else varlen_cu_seqlens(doc_ids_BT)
            if ranges is not None:
                _varlen_cache = (ranges.kv_start, has_image, cu_seqlens)
        if has_image:
            raise ValueError("attention backend 'flash_attn' supports text-only batches (its causal mask "
                             "cannot express bidirectional image spans); this batch holds images: use "
                             "backend='triton' or 'auto'")
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as e:
        raise RuntimeError("attention backend 'flash_attn' needs the optional flash-attn package "
                           "(pip install flash-attn); use backend='triton' or 'auto'") from e
    if not q.is_cuda:
        raise RuntimeError("attention backend 'flash_attn' runs on CUDA only")
    cu_N1, max_len = cu_seqlens
    # [B, H, T, D] -> [B*T, H, D]: flash-attn's packed layout.
    q_NHD, k_NHD, v_NHD = (x.transpose(1, 2).reshape(B * T, H, D) for x in (q, k, v))
    o_NHD = flash_attn_varlen_func(q_NHD, k_NHD, v_NHD, cu_N1, cu_N1, max_len, max_len,
                                   softmax_scale=scale, causal=True)
    return o_NHD.reshape(B, T, H, D).transpose(1, 2)
