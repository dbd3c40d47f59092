"""Early fusion, the main model: image patches enter the decoder through one linear layer.

No vision encoder and no image tokenizer (docs/architecture.md, "Model families"): a flattened `p x p` patch is
projected to the decoder width and takes its place in the token sequence.
"""
from __future__ import annotations

from pretrain.models.config import ModelConfig
from pretrain.models.decoder import MultimodalDecoder
from pretrain.models.layers import PatchProjection, SwiGLU


def build_early_fusion(cfg: ModelConfig) -> MultimodalDecoder:
    patch_proj = PatchProjection(cfg.patch_dim, cfg.width, cfg.init_std)
    return MultimodalDecoder(cfg, patch_proj, lambda layer: SwiGLU(cfg.width, cfg.ffn_hidden_size))
