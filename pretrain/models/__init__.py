"""Model families: `build_model(cfg)` returns the decoder for `cfg.kind`.

The model knows nothing about DeepSpeed: the only seam is the MoE layer's expert-parallel group,
handed in here at build time (`expert_group`, None without expert parallelism).
"""
from __future__ import annotations

from pretrain.models.config import ModelConfig
from pretrain.models.decoder import ModelOutput, MultimodalDecoder


def build_model(cfg: ModelConfig, expert_group=None) -> MultimodalDecoder:
    cfg.validate()
    if cfg.kind == "early":
        from pretrain.models.early_fusion import build_early_fusion
        return build_early_fusion(cfg)
    if cfg.kind == "late":
        from pretrain.models.late_fusion import build_late_fusion
        return build_late_fusion(cfg)
    if cfg.kind == "moe":
        from pretrain.models.sparse_fusion import build_moe
        return build_moe(cfg, expert_group)
    if cfg.kind == "modality_aware":
        from pretrain.models.sparse_fusion import build_modality_aware
        return build_modality_aware(cfg)
    raise NotImplementedError(f"model.kind={cfg.kind!r} is not built yet")


__all__ = ["ModelConfig", "ModelOutput", "MultimodalDecoder", "build_model"]
