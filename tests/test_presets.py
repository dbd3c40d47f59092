"""The paper presets (pretrain/configs/paper/*.yaml) against Table 6 of Shukor et al. 2025.

Every preset loads and validates; widths, depth, learning rates, vision encoders and the shared
recipe are the table's; and `tools/model_stats.py` reports parameters within 2% of the table
(active parameters for the MoE presets).

    .venv/bin/python -m pytest tests/test_presets.py -q
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import yaml

from pretrain.config import load_config
from pretrain.models.config import swiglu_hidden

REPO = Path(__file__).resolve().parent.parent
PAPER = REPO / "pretrain" / "configs" / "paper"
# Table 6, as transcribed in shared/reference/paper_tables.yaml (which the repo does not ship): the
# copy here keeps the test running anywhere; where the shared file exists, the two must agree.
T6 = {
    "early_fusion": {"params": [275e6, 468e6, 932e6, 1.63e9, 2.28e9, 3.35e9],
                     "width": [800, 1088, 1632, 2208, 2624, 3232],
                     "learning_rate": [1.5e-3, 1.5e-3, 5e-4, 4.2e-4, 4e-4, 3.5e-4]},
    "late_fusion": {"params": [289e6, 494e6, 1.0e9, 1.75e9, 2.43e9, 3.7e9],
                    "vision_encoder_width": [384, 512, 768, 1024, 1184, 1536],
                    "width": [768, 1024, 1536, 2048, 2464, 3072],
                    "learning_rate": [1.5e-3, 1.5e-3, 5e-4, 4.2e-4, 3.8e-4, 3.3e-4]},
    "early_fusion_moe": {"active_params": [275e6, 468e6, 932e6, 1.63e9, 2.28e9, 3.35e9],
                         "width": [800, 1088, 1632, 2208, 2624, 3232],
                         "learning_rate": [1.5e-3, 1.5e-3, 5e-4, 4.2e-4, 4e-4, 3.5e-4]},
}
SHARED_TABLES = REPO.parent / "shared" / "reference" / "paper_tables.yaml"

NAMES = {
    "early": ["275m", "468m", "932m", "1.63b", "2.28b", "3.35b"],
    "late": ["289m", "494m", "1b", "1.75b", "2.43b", "3.7b"],
    "moe": ["275m", "468m", "932m", "1.63b", "2.28b", "3.35b"],
}
TABLE_KEY = {"early": "early_fusion", "late": "late_fusion", "moe": "early_fusion_moe"}
PRESETS = [(kind, i, f"{kind}_{size}") for kind, sizes in NAMES.items() for i, size in enumerate(sizes)]
IDS = [name for _, _, name in PRESETS]

def _stats(path: Path) -> dict:
    """`python tools/model_stats.py PATH --json`, run in-process (the same code path, no fork)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("model_stats", REPO / "tools" / "model_stats.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert mod.main([str(path), "--json"]) == 0
    return json.loads(out.getvalue())


def test_every_preset_file_is_covered():
    assert sorted(p.stem for p in PAPER.glob("*.yaml")) == sorted(IDS)


@pytest.mark.parametrize("kind,i,name", PRESETS, ids=IDS)
def test_preset_loads_and_follows_the_recipe(kind, i, name):
    cfg = load_config(PAPER / f"{name}.yaml")
    cfg.validate(world_size=64)  # batch sizes divide on a 64-GPU job (and 8, 16, 32)
    m, d, t = cfg.model, cfg.data, cfg.train
    assert m.kind == kind and cfg.run.name == name
    assert (m.depth, m.vocab_size, m.patch_size, m.image_size) == (24, 50432, 14, 224)
    assert m.ffn_hidden_size == swiglu_hidden(m.width) and m.ffn_hidden_size % 256 == 0
    assert m.head_dim % 16 == 0 and m.head_dim <= 128 and m.width % m.head_dim == 0
    assert (d.seq_len, d.image_size, d.patch_size) == (1024, 224, 14)
    assert d.weights == [0.45, 0.45, 0.10] and (d.crop_scale_min, d.crop_scale_max, d.hflip_prob) == (0.4, 1.0, 0.5)
    assert (t.global_batch_size, t.warmup_steps, t.cooldown_fraction) == (2048, 5000, 0.2)
    assert (t.beta1, t.beta2, t.weight_decay, t.grad_clip, t.precision) == (0.9, 0.95, 1e-4, 1.0, "bf16")
    assert t.zero_stage in ((1, 2) if kind == "moe" else (2,))
    if kind == "late":
        v = m.vision
        assert v.depth == 24 and v.lr_mult == 0.01 and v.width % v.head_dim == 0 and v.head_dim % 16 == 0
    if kind == "moe":
        assert (m.moe.num_experts, m.moe.top_k, m.moe.aux_loss_weight) == (8, 1, 0.01)


def test_table6_copy_matches_the_shared_transcription():
    if not SHARED_TABLES.is_file():
        return  # nothing to compare against outside the project checkout
    shared = yaml.safe_load(SHARED_TABLES.read_text())["table6_presets"]
    for key, row in T6.items():
        for field, values in row.items():
            assert [float(v) for v in shared[key][field]] == pytest.approx(values), f"{key}.{field}"
        assert shared[key]["depth"] == 24


@pytest.mark.parametrize("kind,i,name", PRESETS, ids=IDS)
def test_preset_matches_table6(kind, i, name):
    cfg = load_config(PAPER / f"{name}.yaml")
    row = T6[TABLE_KEY[kind]]
    assert cfg.model.width == row["width"][i]
    assert cfg.train.lr == pytest.approx(float(row["learning_rate"][i]))
    if kind == "late":
        assert cfg.model.vision.width == row["vision_encoder_width"][i]
    stats = _stats(PAPER / f"{name}.yaml")
    if kind == "moe":
        target, got = float(row["active_params"][i]), stats["active_params"]
        assert stats["params"] > 4 * got  # eight experts: the total is far above the active count
    else:
        target, got = float(row["params"][i]), stats["params"]
    assert abs(got / target - 1) < 0.02, f"{name}: {got / 1e6:.1f}M vs Table 6's {target / 1e6:.0f}M"
    assert stats["vision_params"] > 0 if kind == "late" else stats["vision_params"] == 0
    assert stats["flops_per_token"] > 0 and stats["embedding_params"] == 2 * 50432 * cfg.model.width
