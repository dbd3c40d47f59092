"""The key/value cache of generation, and the packed mask it applies over the cached sequence.

A `KVCache` holds, per layer, the keys and values of every slot written so far, plus each slot's
document and image id. A forward step writes `n` new slots (the prompt in prefill, one token per
row in decoding) and its queries attend all written slots under the training mask (docs/architecture.md):

    allowed(i, j) = doc[i] == doc[j] and (j <= i or (img[i] >= 0 and img[i] == img[j]))

so the prefill is bidirectional inside an image span, causal for text and blind across documents
(a left-padded row's padding slots are each their own document), exactly as the uncached
full-sequence forward; decoding steps are causal text queries. `query_mask` evaluates the rule
for the step's query rows only (O(n * S) memory, not O(S^2)).

Use: `cache.begin(doc_ids_Bn, image_ids_Bn)` before a step's forward, each layer's attention
calls `cache.attend(q, k, v)` in layer order (pretrain/models/layers.py), `cache.commit()` after.
Buffers are allocated once for `max_len` slots, so decoding never reallocates.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def query_mask(doc_q_Bn: torch.Tensor, img_q_Bn: torch.Tensor, first_slot: int,
               doc_k_BS: torch.Tensor, img_k_BS: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, n, S]: the packed rule for queries at slots first_slot.. over keys 0..S-1."""
    n, S = doc_q_Bn.shape[1], doc_k_BS.shape[1]
    q_idx_n1 = torch.arange(first_slot, first_slot + n, device=doc_q_Bn.device)[:, None]
    k_idx_1S = torch.arange(S, device=doc_q_Bn.device)[None, :]
    same_doc_BnS = doc_q_Bn[:, :, None] == doc_k_BS[:, None, :]
    same_img_BnS = (img_q_Bn[:, :, None] >= 0) & (img_q_Bn[:, :, None] == img_k_BS[:, None, :])
    return (same_doc_BnS & ((k_idx_1S <= q_idx_n1)[None] | same_img_BnS))[:, None]


class KVCache:
    """Keys and values of `n_layers` attention layers for `batch` rows of up to `max_len` slots."""

    def __init__(self, n_layers: int, batch: int, n_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (n_layers, batch, n_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.doc_ids_BS = torch.full((batch, max_len), -1, dtype=torch.int32, device=device)
        self.image_ids_BS = torch.full((batch, max_len), -1, dtype=torch.int32, device=device)
        self.n_layers, self.max_len = n_layers, max_len
        self.length = 0  # slots written by committed steps
        self._n = 0  # slots of the step in progress
        self._layer = 0
        self._mask = None

    @classmethod
    def for_model(cls, model, batch: int, max_len: int, dtype: torch.dtype, device) -> "KVCache":
        cfg = model.cfg
        return cls(cfg.depth, batch, cfg.n_heads, max_len, cfg.head_dim, dtype, device)

    def begin(self, doc_ids_Bn: torch.Tensor, image_ids_Bn: torch.Tensor) -> None:
        """Start a step that writes `n` new slots with these document and image ids."""
        n = doc_ids_Bn.shape[1]
        end = self.length + n
        if end > self.max_len:
            raise ValueError(f"KVCache: {end} slots needed, the cache holds {self.max_len}")
        self.doc_ids_BS[:, self.length:end] = doc_ids_Bn
        self.image_ids_BS[:, self.length:end] = image_ids_Bn
        self._mask = query_mask(doc_ids_Bn, image_ids_Bn, self.length,
                                self.doc_ids_BS[:, :end], self.image_ids_BS[:, :end])
        self._n, self._layer = n, 0

    def attend(self, q_BHnd: torch.Tensor, k_BHnd: torch.Tensor, v_BHnd: torch.Tensor) -> torch.Tensor:
        """Store this layer's new keys/values; attention of the new queries over the cache."""
        if self._mask is None or self._layer >= self.n_layers:
            raise RuntimeError("KVCache.attend outside a step: call begin() before the forward")
        s0, end, l = self.length, self.length + self._n, self._layer
        self.k[l, :, :, s0:end] = k_BHnd
        self.v[l, :, :, s0:end] = v_BHnd
        self._layer += 1
        return F.scaled_dot_product_attention(q_BHnd, self.k[l, :, :, :end], self.v[l, :, :, :end],
                                              attn_mask=self._mask)

    def commit(self) -> None:
        if self._layer != self.n_layers:
            raise RuntimeError(f"KVCache.commit: {self._layer} of {self.n_layers} layers attended")
        self.length += self._n
        self._n, self._mask = 0, None
