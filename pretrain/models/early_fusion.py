"""Early fusion, the main model: image patches enter the decoder through one linear layer.

No vision encoder and no image tokenizer (DESIGN.md, "The models"): a flattened `p x p` patch is
projected to the decoder width and takes its place in the token sequence.
"""
from __future__ import annotations

from torch import nn

from pretrain.models.config import ModelConfig
from pretrain.models.decoder import MultimodalDecoder
from pretrain.models.layers import SwiGLU


def build_early_fusion(cfg: ModelConfig) -> MultimodalDecoder:
    patch_proj = nn.Linear(cfg.patch_dim, cfg.width)
    return MultimodalDecoder(cfg, patch_proj, lambda layer: SwiGLU(cfg.width, cfg.ffn_hidden_size))
