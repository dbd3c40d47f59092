"""Transformer building blocks shared by every model family.

RMSNorm, rotary position embeddings driven by per-token `position_ids` (so each packed document
restarts at 0), attention with QK-Norm over the packed multimodal mask, the SwiGLU FFN, and the
pre-norm block. The FFN slot of a block is any module with `forward(x_BTD, is_patch_BT)`; MoE
layers (pretrain/models/moe.py) plug in there.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kernels.attention import packed_attention


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: bf16 sums of squares lose the small components.
        x_f = x.float()
        x_f = x_f * torch.rsqrt(x_f.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x_f * self.weight.float()).type_as(x)


def rope_tables(position_ids_BT: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin `[B, 1, T, head_dim/2]`, computed once per batch and shared by all layers."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids_BT.device,
                                             dtype=torch.float32) / head_dim))
    angles_BTF = position_ids_BT.float()[..., None] * inv_freq
    return angles_BTF.cos()[:, None], angles_BTF.sin()[:, None]


def apply_rope(x_BHTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Rotate-half convention: the two halves of the head dimension form the pairs.
    x1, x2 = x_BHTD.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.type_as(x_BHTD)


class Attention(nn.Module):
    """Multi-head attention with QK-Norm (before RoPE) over the packed multimodal mask."""

    def __init__(self, width: int, head_dim: int, norm_eps: float, backend: str):
        super().__init__()
        self.n_heads = width // head_dim
        self.head_dim = head_dim
        self.backend = backend
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.out = nn.Linear(width, width, bias=False)
        self.q_norm = RMSNorm(head_dim, norm_eps)
        self.k_norm = RMSNorm(head_dim, norm_eps)

    def forward(self, x_BTD: torch.Tensor, ctx: "BatchContext") -> torch.Tensor:
        B, T, D = x_BTD.shape
        qkv = self.qkv(x_BTD).view(B, T, 3, self.n_heads, self.head_dim)
        q_BHTd, k_BHTd, v_BHTd = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q_BHTd = apply_rope(self.q_norm(q_BHTd), ctx.cos, ctx.sin)
        k_BHTd = apply_rope(self.k_norm(k_BHTd), ctx.cos, ctx.sin)
        if ctx.kv_cache is not None:  # generation: this step's keys join the cache (pretrain/generate/)
            o_BHTd = ctx.kv_cache.attend(q_BHTd, k_BHTd, v_BHTd)
        else:
            o_BHTd = packed_attention(q_BHTd, k_BHTd, v_BHTd, ctx.doc_ids, ctx.image_ids,
                                      backend=self.backend, ranges=ctx.ranges)
        return self.out(o_BHTd.transpose(1, 2).reshape(B, T, D))


class SwiGLU(nn.Module):
    """The dense FFN: `w2(silu(w1 x) * w3 x)`."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(width, hidden, bias=False)
        self.w3 = nn.Linear(width, hidden, bias=False)
        self.w2 = nn.Linear(hidden, width, bias=False)

    def forward(self, x_BTD: torch.Tensor, is_patch_BT: torch.Tensor | None = None) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x_BTD)) * self.w3(x_BTD))


class BatchContext:
    """Per-batch tensors every layer needs, computed once per forward pass. `kv_cache` (None in
    training) is a `pretrain.generate.cache.KVCache`: attention then reads keys and values of
    earlier steps from it and applies the packed mask over the whole cached sequence."""

    def __init__(self, doc_ids, image_ids, is_patch, cos, sin, ranges, kv_cache=None):
        self.doc_ids, self.image_ids, self.is_patch = doc_ids, image_ids, is_patch
        self.cos, self.sin, self.ranges = cos, sin, ranges
        self.kv_cache = kv_cache


class Block(nn.Module):
    """Pre-norm transformer block; `ffn` is a SwiGLU or any mixture with the same call."""

    def __init__(self, width: int, head_dim: int, norm_eps: float, attention_backend: str, ffn: nn.Module):
        super().__init__()
        self.attn_norm = RMSNorm(width, norm_eps)
        self.attn = Attention(width, head_dim, norm_eps, attention_backend)
        self.ffn_norm = RMSNorm(width, norm_eps)
        self.ffn = ffn

    def forward(self, x_BTD: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), ctx)
        return x_BTD + self.ffn(self.ffn_norm(x_BTD), ctx.is_patch)


class PatchProjection(nn.Linear):
    """Early fusion's image input (and the MoE's): a flattened `p x p` patch -> decoder width.

    Initialised for the scale of the token embeddings it sits among: weight N(0, std / sqrt(fan_in)),
    zero bias. A patch whose pixels have RMS `r` (pixels are normalised to [-1, 1], so r <= 1)
    then embeds with RMS `std * r`, the text embeddings' `std` at most. The decoder's N(0, std)
    for every matrix would multiply that by sqrt(fan_in) (24x for 14 px patches), and PyTorch's
    default bias U(+-1/sqrt(fan_in)) adds a constant offset of RMS 1/sqrt(3 fan_in) to every
    patch; together image embeddings started at 7-11x the RMS of text embeddings, so the first
    block's pre-norm saw images at another scale than text (tests/test_model.py measures both)."""

    def __init__(self, patch_dim: int, width: int, init_std: float):
        self.init_std = init_std  # before nn.Linear.__init__, which calls reset_parameters()
        super().__init__(patch_dim, width)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.init_std / math.sqrt(self.in_features))
        nn.init.zeros_(self.bias)


def init_weights(module: nn.Module, std: float, depth: int) -> None:
    """Normal(0, std) for every matrix; residual-branch outputs scaled by 1/sqrt(2*depth)
    (GPT-2's rule) so the residual stream's variance does not grow with depth."""
    for name, p in module.named_parameters():
        if p.dim() < 2 or getattr(p, "expert_init", False):
            continue
        s = std / math.sqrt(2 * depth) if name.endswith(("out.weight", "w2.weight", "w2_EHD")) else std
        nn.init.normal_(p, mean=0.0, std=s)
    # MoE experts initialise themselves per global expert (pretrain/models/moe.py), so the model is
    # the same function of the seed whatever the expert-parallel size.
    for m in module.modules():
        if hasattr(m, "reset_expert_parameters"):
            m.reset_expert_parameters()
