"""The late-fusion vision encoder: a CLIP-style ViT over the batch's flattened patches.

    patches [P, C*p*p]  ->  [n_images, N_p, C*p*p]        (P = n_images * N_p, images contiguous)
    x = ln_pre(patch_embed(patches) + pos_embed)          (CLIP's pre-LN stem; no class token)
    x = blocks(x)    pre-norm: x += attn(ln1(x)); x += mlp(ln2(x)), GELU MLP 4x width
    out = proj(ln_post(x))  ->  [P, decoder width]        (one row per patch, same order as input)

Choices, and why:
- CLIP's block (Radford et al., 2021; the paper says late fusion "follows the CLIP architecture"):
  LayerNorm with bias, biased q/k/v/out and MLP linears, GELU, no QK-Norm, no RoPE.
- Every image is the same size (`model.image_size`, `model.patch_size`), so an image is exactly
  `N_p = (image_size / patch_size)^2` consecutive rows of `PackedBatch.patches`, and the encoder
  runs as a dense batch of `[n_images, N_p]` sequences. Attention is plain bidirectional SDPA
  inside each sequence: no mask is needed, and images cannot see each other by construction.
  (SDPA picks flash/cuDNN kernels on GPU; head sizes are multiples of 8 up to 256 there.)
- A learned absolute position embedding over the fixed `N_p`-patch grid, in the row-major order
  the data pipeline emits patches (CLIP's choice; the grid never changes in this repo, so there
  is nothing to interpolate). `model.image_size` must equal `data.image_size`.
- No class token: the decoder consumes every patch embedding, not a pooled one.
- The projection to the decoder width (one linear layer with bias, as early fusion's patch
  projection) lives here, so `N_v` (the paper's vision-specific parameters) is exactly this
  module's parameter count.

Try it:  python -m pretrain.models.vision   (prints shapes and parameter count of a small ViT)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pretrain.models.config import ModelConfig, VisionConfig


class ViTAttention(nn.Module):
    """Bidirectional multi-head self-attention within each image (CLIP: biased projections)."""

    def __init__(self, width: int, head_dim: int):
        super().__init__()
        self.n_heads = width // head_dim
        self.head_dim = head_dim
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x_INV: torch.Tensor) -> torch.Tensor:
        I, N, V = x_INV.shape
        qkv = self.qkv(x_INV).view(I, N, 3, self.n_heads, self.head_dim)
        q_IHNd, k_IHNd, v_IHNd = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        o_IHNd = F.scaled_dot_product_attention(q_IHNd, k_IHNd, v_IHNd)  # no mask: one image per row
        return self.out(o_IHNd.transpose(1, 2).reshape(I, N, V))


class ViTBlock(nn.Module):
    def __init__(self, width: int, head_dim: int, ffn_hidden: int, eps: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(width, eps=eps)
        self.attn = ViTAttention(width, head_dim)
        self.ln2 = nn.LayerNorm(width, eps=eps)
        self.fc1 = nn.Linear(width, ffn_hidden)
        self.fc2 = nn.Linear(ffn_hidden, width)

    def forward(self, x_INV: torch.Tensor) -> torch.Tensor:
        x_INV = x_INV + self.attn(self.ln1(x_INV))
        return x_INV + self.fc2(F.gelu(self.fc1(self.ln2(x_INV))))


def vit_ffn_hidden(v: VisionConfig) -> int:
    return v.ffn_hidden or 4 * v.width


class VisionEncoder(nn.Module):
    """`forward(patches [P, C*p*p]) -> [P, decoder width]`: the late-fusion `image_embedder`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        v = cfg.vision
        self.cfg = cfg
        self.patches_per_image = cfg.patches_per_image
        # CLIP's patch embedding is a bias-free conv; on pre-flattened patches that is a Linear.
        self.patch_embed = nn.Linear(cfg.patch_dim, v.width, bias=False)
        self.pos_embed = nn.Parameter(torch.zeros(self.patches_per_image, v.width))
        self.ln_pre = nn.LayerNorm(v.width, eps=cfg.norm_eps)
        self.blocks = nn.ModuleList(ViTBlock(v.width, v.head_dim, vit_ffn_hidden(v), cfg.norm_eps)
                                    for _ in range(v.depth))
        self.ln_post = nn.LayerNorm(v.width, eps=cfg.norm_eps)
        self.proj = nn.Linear(v.width, cfg.width)  # into the decoder's width
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) matrices and position table, zero biases, unit LayerNorm gains;
        residual-branch outputs (attn.out, fc2) scaled by 1/sqrt(2 * vision depth), the decoder's
        GPT-2 rule applied with the encoder's own depth. The projection into the decoder reads
        `ln_post`'s unit-RMS features: N(0, init_std / sqrt(vision width)) gives image embeddings
        of the text embeddings' RMS (init_std), as early fusion's `PatchProjection`."""
        std, depth = self.cfg.init_std, max(self.cfg.vision.depth, 1)
        nn.init.normal_(self.pos_embed, mean=0.0, std=std)
        for name, m in self.named_modules():
            if isinstance(m, nn.LayerNorm):
                m.reset_parameters()
            elif isinstance(m, nn.Linear):
                residual_out = name.endswith(("attn.out", "fc2"))
                s = std / math.sqrt(2 * depth) if residual_out else std
                nn.init.normal_(m.weight, mean=0.0, std=s / math.sqrt(m.in_features) if name == "proj" else s)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, patches_PC: torch.Tensor) -> torch.Tensor:
        P, C = patches_PC.shape
        n_p = self.patches_per_image
        if P % n_p:
            raise ValueError(f"VisionEncoder: {P} patches is not a whole number of images of {n_p} "
                             f"patches; model.image_size/model.patch_size must match the data's")
        x_INV = self.patch_embed(patches_PC.reshape(P // n_p, n_p, C)) + self.pos_embed.to(patches_PC.dtype)
        x_INV = self.ln_pre(x_INV)
        for block in self.blocks:
            if self.cfg.activation_checkpointing and self.training:
                x_INV = checkpoint(block, x_INV, use_reentrant=False)
            else:
                x_INV = block(x_INV)
        return self.proj(self.ln_post(x_INV)).reshape(P, -1)


if __name__ == "__main__":
    cfg = ModelConfig(kind="late", width=64, image_size=32, patch_size=8,
                      vision=VisionConfig(width=48, depth=2, head_dim=16))
    enc = VisionEncoder(cfg)
    out = enc(torch.randn(3 * cfg.patches_per_image, cfg.patch_dim))
    print(f"3 images x {cfg.patches_per_image} patches -> {tuple(out.shape)}; "
          f"{sum(p.numel() for p in enc.parameters()):,} parameters")
