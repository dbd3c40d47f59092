"""The late-fusion vision encoder: a CLIP-style ViT over the batch's flattened patches.

    patches [P, C*p*p]  ->  [n_images, N_p, C*p*p]        (P = n_images * N_p, images contiguous)
    x = ln_pre([cls] + patch_embed(patches) + pos_embed)  (CLIP's pre-LN stem; class token optional)
    x = blocks(x)    pre-norm: x += attn(ln1(x)); x += mlp(ln2(x)), GELU MLP 4x width
    out = proj(ln_post(x)[patches])  ->  [P, decoder width]   (one row per patch, input order)

Choices, and why:
- CLIP's block (Radford et al., 2021; the paper says late fusion "follows the CLIP architecture"):
  LayerNorm with bias, biased q/k/v/out and MLP linears, GELU, no QK-Norm, no RoPE.
- Every image is the same size (`model.image_size`, `model.patch_size`), so an image is exactly
  `N_p = (image_size / patch_size)^2` consecutive rows of `PackedBatch.patches`, and the encoder
  runs as a dense batch of `[n_images, N_p]` sequences. Attention is plain bidirectional SDPA
  inside each sequence: no mask is needed, and images cannot see each other by construction.
  (SDPA picks flash/cuDNN kernels on GPU; head sizes are multiples of 8 up to 256 there.)
- A learned absolute position embedding over the fixed `N_p`-patch grid, in the row-major order
  the data pipeline emits patches (CLIP's choice). `model.image_size` must equal
  `data.image_size`; a pretrained table of another grid is interpolated once, when it is loaded
  (pretrain/models/vision_hf.py).
- No class token by default: the decoder consumes every patch embedding, not a pooled one.
- The projection to the decoder width (one linear layer with bias, as early fusion's patch
  projection) lives here, so `N_v` (the paper's vision-specific parameters) is exactly this
  module's parameter count.

Switches that make the encoder run a pretrained tower's exact math (model.vision.*; set by the
user to match the checkpoint, which `vision_hf` checks): `activation` (gelu | quick_gelu, OpenAI
CLIP's x*sigmoid(1.702x) | gelu_tanh, SigLIP's), `pre_norm` (CLIP's ln_pre; SigLIP has none),
`class_token` (CLIP's: it takes part in attention, its output is dropped), `norm_eps`.

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


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's GELU approximation."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": F.gelu, "quick_gelu": quick_gelu,
               "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


class ViTBlock(nn.Module):
    def __init__(self, width: int, head_dim: int, ffn_hidden: int, eps: float, activation: str = "gelu"):
        super().__init__()
        self.ln1 = nn.LayerNorm(width, eps=eps)
        self.attn = ViTAttention(width, head_dim)
        self.ln2 = nn.LayerNorm(width, eps=eps)
        self.fc1 = nn.Linear(width, ffn_hidden)
        self.fc2 = nn.Linear(ffn_hidden, width)
        self.act = ACTIVATIONS[activation]

    def forward(self, x_INV: torch.Tensor) -> torch.Tensor:
        x_INV = x_INV + self.attn(self.ln1(x_INV))
        return x_INV + self.fc2(self.act(self.fc1(self.ln2(x_INV))))


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
        self.class_embed = nn.Parameter(torch.zeros(v.width)) if v.class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(self.patches_per_image + int(v.class_token), v.width))
        self.ln_pre = nn.LayerNorm(v.width, eps=v.norm_eps) if v.pre_norm else nn.Identity()
        self.blocks = nn.ModuleList(ViTBlock(v.width, v.head_dim, vit_ffn_hidden(v), v.norm_eps, v.activation)
                                    for _ in range(v.depth))
        self.ln_post = nn.LayerNorm(v.width, eps=v.norm_eps)
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
        if self.class_embed is not None:
            nn.init.normal_(self.class_embed, mean=0.0, std=std)
        for name, m in self.named_modules():
            if isinstance(m, nn.LayerNorm):
                m.reset_parameters()
            elif isinstance(m, nn.Linear):
                residual_out = name.endswith(("attn.out", "fc2"))
                s = std / math.sqrt(2 * depth) if residual_out else std
                nn.init.normal_(m.weight, mean=0.0, std=s / math.sqrt(m.in_features) if name == "proj" else s)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def features(self, patches_PC: torch.Tensor) -> torch.Tensor:
        """`ln_post` of the last block's output at every patch: [P, vision width] (before `proj`)."""
        P, C = patches_PC.shape
        n_p = self.patches_per_image
        if P % n_p:
            raise ValueError(f"VisionEncoder: {P} patches is not a whole number of images of {n_p} "
                             f"patches; model.image_size/model.patch_size must match the data's")
        x_INV = self.patch_embed(patches_PC.reshape(P // n_p, n_p, C))
        if self.class_embed is not None:
            cls_I1V = self.class_embed.to(x_INV.dtype).expand(x_INV.shape[0], 1, -1)
            x_INV = torch.cat([cls_I1V, x_INV], dim=1)
        x_INV = self.ln_pre(x_INV + self.pos_embed.to(x_INV.dtype))
        for block in self.blocks:
            if self.cfg.activation_checkpointing and self.training:
                x_INV = checkpoint(block, x_INV, use_reentrant=False)
            else:
                x_INV = block(x_INV)
        if self.class_embed is not None:
            x_INV = x_INV[:, 1:]
        return self.ln_post(x_INV).reshape(P, -1)

    def forward(self, patches_PC: torch.Tensor) -> torch.Tensor:
        return self.proj(self.features(patches_PC))


if __name__ == "__main__":
    cfg = ModelConfig(kind="late", width=64, image_size=32, patch_size=8,
                      vision=VisionConfig(width=48, depth=2, head_dim=16))
    enc = VisionEncoder(cfg)
    out = enc(torch.randn(3 * cfg.patches_per_image, cfg.patch_dim))
    print(f"3 images x {cfg.patches_per_image} patches -> {tuple(out.shape)}; "
          f"{sum(p.numel() for p in enc.parameters()):,} parameters")
