"""Sparse early fusion and its modality-aware baseline: the early-fusion decoder with other FFNs.

`build_model` (pretrain/models/__init__.py) calls these for model.kind `moe` and `modality_aware`.
They live apart from the FFN layers (moe.py) so that moe.py imports neither the decoder nor the
DeepSpeed subclass (moe_parallel.py, which builds on moe.py): the import graph stays acyclic.
"""
from __future__ import annotations

from pretrain.models.config import ModelConfig
from pretrain.models.decoder import MultimodalDecoder
from pretrain.models.layers import PatchProjection
from pretrain.models.moe import ModalityAwareFFN, MoEFFN


def build_moe(cfg: ModelConfig, expert_group=None) -> MultimodalDecoder:
    """Sparse early fusion: the early-fusion decoder with every FFN an `MoEFFN`.

    With an expert group (training under DeepSpeed) the layers are the DeepSpeed-registered
    subclass (moe_parallel.DeepSpeedMoEFFN) so the engine treats their experts as MoE params.
    """
    layer_cls = MoEFFN
    if expert_group is not None:
        from pretrain.models.moe_parallel import DeepSpeedMoEFFN  # imports deepspeed: only when needed
        layer_cls = DeepSpeedMoEFFN
    patch_proj = PatchProjection(cfg.patch_dim, cfg.width, cfg.init_std)
    return MultimodalDecoder(cfg, patch_proj, lambda layer: layer_cls(
        cfg.width, cfg.ffn_hidden_size, cfg.moe, cfg.init_std, cfg.depth, expert_group,
        init=False))


def build_modality_aware(cfg: ModelConfig) -> MultimodalDecoder:
    """Modality-aware baseline: the early-fusion decoder with every FFN a `ModalityAwareFFN`."""
    patch_proj = PatchProjection(cfg.patch_dim, cfg.width, cfg.init_std)
    return MultimodalDecoder(cfg, patch_proj,
                             lambda layer: ModalityAwareFFN(cfg.width, cfg.ffn_hidden_size))
