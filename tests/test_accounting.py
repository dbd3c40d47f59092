"""Parameter and FLOP accounting (pretrain/accounting.py) against instantiated models.

- the analytic counts equal `sum(p.numel())` of the built model, for every family;
- `training_flops` equals torch's FlopCounterMode on a real forward + backward (matmuls and
  attention, the latter through SDPA's math path so the counter sees its bmm's);
- the embedding convention that reproduces the paper's Table 6.

    .venv/bin/python -m pytest tests/test_accounting.py -q
"""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pretrain.accounting import (count_model_params, flops_per_token, model_param_counts, paper_flops,
                                 param_counts, training_flops)
from pretrain.batch import IGNORE_INDEX
from pretrain.models import build_model
from pretrain.models.config import ModelConfig, MoEConfig, VisionConfig
from test_late_fusion import LAYOUT, SEQ, packed_batch, tiny_cfg

CASES = {
    "early": dict(kind="early"),
    "early_ffn": dict(kind="early", ffn_hidden=40),
    "late": dict(kind="late"),
    "late_ffn": dict(kind="late", vision=VisionConfig(width=24, depth=3, head_dim=8, ffn_hidden=40)),
    "moe_top1": dict(kind="moe", moe=MoEConfig(num_experts=4, top_k=1)),
    "moe_top2": dict(kind="moe", moe=MoEConfig(num_experts=4, top_k=2)),
    "modality_aware": dict(kind="modality_aware"),
}


def _build(name: str):
    cfg = tiny_cfg(**CASES[name])
    return cfg, build_model(cfg)


@pytest.mark.parametrize("name", CASES)
def test_analytic_counts_equal_the_built_model(name):
    cfg, model = _build(name)
    built = count_model_params(model)
    assert built == param_counts(cfg)
    assert built.params == sum(p.numel() for p in model.parameters())
    assert built.embedding_params == model.embed.weight.numel() + model.lm_head.weight.numel()
    assert built.vision_params == (sum(p.numel() for p in model.image_embedder.parameters())
                                   if cfg.kind == "late" else 0)
    d = model_param_counts(model)
    assert d["params"] == d["total_params"] == built.params and d["active_params"] == built.active_params


@pytest.mark.parametrize("name", ["moe_top1", "moe_top2", "modality_aware"])
def test_active_params_count_top_k_experts_and_the_router(name):
    cfg, model = _build(name)
    c = param_counts(cfg)
    swiglu = 3 * cfg.width * cfg.ffn_hidden_size
    if cfg.kind == "moe":
        E, k = cfg.moe.num_experts, cfg.moe.top_k
        assert c.params - c.active_params == cfg.depth * (E - k) * swiglu
        dense = param_counts(tiny_cfg(kind="early"))
        assert c.active_params == dense.params + cfg.depth * ((k - 1) * swiglu + cfg.width * E)
    else:
        assert c.params - c.active_params == cfg.depth * swiglu
    assert c.decoder_params == c.active_params  # N of 6ND is the active count


@pytest.mark.parametrize("name", CASES)
def test_training_flops_match_torch_flop_counter(name):
    torch.manual_seed(0)
    cfg, model = _build(name)
    batch = packed_batch(LAYOUT, SEQ, cfg.patch_dim, cfg.patches_per_image)
    # The pixels need a gradient for the first image layer's dX matmul to run: accounting counts
    # 6 FLOPs per weight for every layer, as the 6ND convention does.
    batch.patches.requires_grad_(True)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(batch).loss.backward()
    n_targets = int((batch.labels != IGNORE_INDEX).sum())
    expected = training_flops(cfg, SEQ, tokens=batch.tokens.numel(), image_tokens=int(batch.is_patch.sum()),
                              target_tokens=n_targets, attention="full")
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-9)


def test_flops_per_token_text_only_is_the_standard_formula():
    cfg = tiny_cfg(kind="early")
    w, L, V, T = cfg.width, cfg.depth, cfg.vocab_size, 128
    non_embedding_matmul = L * (4 * w * w + 3 * w * cfg.ffn_hidden_size)
    assert flops_per_token(cfg, T) == 6 * (non_embedding_matmul + V * w) + 12 * L * w * T
    causal = flops_per_token(cfg, T, attention="causal")
    assert causal == 6 * (non_embedding_matmul + V * w) + 12 * L * w * (T + 1) / 2


def test_paper_flops_use_active_params_and_vision_tokens():
    moe = param_counts(tiny_cfg(kind="moe", moe=MoEConfig(num_experts=8, top_k=1)))
    assert paper_flops(moe, 1000) == 6 * moe.active_params * 1000
    late = param_counts(tiny_cfg(kind="late"))
    assert paper_flops(late, 1000, 300) == 6 * (late.vision_params * 300 + late.decoder_params * 1000)


def test_table6_counts_include_both_embeddings():
    """275M for width 800 only when the input and output embeddings are both counted."""
    c = param_counts(ModelConfig(kind="early", width=800, depth=24, head_dim=80, vocab_size=50432))
    assert ModelConfig(width=800).ffn_hidden_size == 2304
    assert abs(c.params / 275e6 - 1) < 0.005
    assert abs((c.params - c.embedding_params) / 275e6 - 1) > 0.25
    assert abs((c.params - c.embedding_params // 2) / 275e6 - 1) > 0.1
