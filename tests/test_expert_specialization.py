"""Expert specialisation (paper §4.4, Figures 12-13): the score on synthetic counts, the route
counting against MoEFFN's own statistics, and tools/expert_specialization.py end to end on a tiny
MoE checkpoint trained for two steps by pretrain.train (one subprocess, world size 1).

    python -m pytest tests/test_expert_specialization.py -q
"""
import json
import subprocess

import numpy as np
import pytest
import torch

from pretrain.scaling.specialization import (
    balanced_image_share, binary_entropy, image_share, load_weighted_score, specialization_score,
    uniform_deviation_score)
from tests.helpers import PYTHON, REPO, TINY_OVERRIDES

MOE_CONFIG = "pretrain/configs/demo_moe.yaml"


def _load_tool():
    import importlib.util
    spec = importlib.util.spec_from_file_location("expert_specialization_tool",
                                                  REPO / "tools" / "expert_specialization.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _counts(text, image):
    """[L, E] text and image counts -> [L, E, 2]."""
    return np.stack([np.asarray(text), np.asarray(image)], axis=-1)


def test_binary_entropy():
    h = binary_entropy([0.0, 1.0, 0.5, 0.25, np.nan])
    assert h[0] == 0 and h[1] == 0 and h[2] == pytest.approx(1.0)
    assert h[3] == pytest.approx(-(0.25 * np.log2(0.25) + 0.75 * np.log2(0.75)))
    assert np.isnan(h[4])


def test_score_is_one_for_separated_and_zero_for_mixed_experts():
    separated = _counts([[100, 0, 7, 0], [0, 3, 0, 50]], [[0, 40, 0, 9], [12, 0, 80, 0]])
    np.testing.assert_allclose(specialization_score(separated), [1.0, 1.0])
    mixed = _counts([[10, 25, 1, 300]], [[10, 25, 1, 300]])
    np.testing.assert_allclose(specialization_score(mixed), [0.0], atol=1e-12)
    # half separated, half mixed -> 0.5; an expert that got no token is left out of the mean
    half = _counts([[5, 0, 8, 0]], [[0, 5, 8, 0]])
    np.testing.assert_allclose(specialization_score(half), [2 / 3])
    assert np.isnan(image_share(half)[0, 3])
    # a known value: p = 1/4 for every expert
    quarter = _counts([[3, 30]], [[1, 10]])
    np.testing.assert_allclose(specialization_score(quarter), [1 - binary_entropy(0.25)])
    # no token in the layer at all -> NaN, not 0 or 1
    assert np.isnan(specialization_score(np.zeros((1, 4, 2)))[0])


def test_balanced_score_removes_the_modality_mix():
    # A router blind to modality on data with 90 % image tokens: every expert sees 90 % images.
    blind = _counts([[10, 20, 5, 1]], [[90, 180, 45, 9]])
    assert specialization_score(blind)[0] == pytest.approx(1 - binary_entropy(0.9))  # raw: 0.53
    np.testing.assert_allclose(balanced_image_share(blind), 0.5)
    np.testing.assert_allclose(specialization_score(blind, normalize="modality"), [0.0], atol=1e-12)
    separated = _counts([[10, 0]], [[0, 90]])
    np.testing.assert_allclose(specialization_score(separated, normalize="modality"), [1.0])
    # one modality absent: the normalised share is undefined, the raw score trivially 1
    text_only = _counts([[4, 9]], [[0, 0]])
    assert np.isnan(specialization_score(text_only, normalize="modality")[0])
    assert specialization_score(text_only)[0] == 1.0
    # appendix E.2's score: 0 for uniform routing of each modality
    uniform = _counts([[5, 5, 5, 5]], [[2, 2, 2, 2]])
    np.testing.assert_allclose(uniform_deviation_score(uniform), [0.0])
    assert uniform_deviation_score(separated)[0] == pytest.approx(0.5)  # |1-.5|, |0-.5| averaged
    # load-weighted variant: a 2-token unimodal expert barely counts next to a busy mixed one
    skewed = _counts([[1, 99]], [[0, 99]])
    assert specialization_score(skewed)[0] == pytest.approx(0.5)
    assert load_weighted_score(skewed)[0] == pytest.approx(1 / 199)
    assert np.isnan(load_weighted_score(np.zeros((1, 3, 2)))[0])


@pytest.fixture(scope="module")
def tiny_moe_cfg(tiny_demo):
    from pretrain.config import load_config
    return load_config(MOE_CONFIG, [*TINY_OVERRIDES, f"data.root={tiny_demo}", "run.dir=/nonexistent"])


def test_counts_match_the_moe_layers_own_statistics(tiny_moe_cfg):
    """With padding counted, the recomputed routes equal MoEFFN.last_counts_E2 of the same
    forward; without, the padding positions are gone; moe_metrics' score agrees with ours."""
    from pretrain.data.loader import build_eval_batches, load_tokenizer
    from pretrain.models import build_model
    from pretrain.models.moe import moe_layers, moe_metrics
    from pretrain.scaling.specialization import collect_expert_counts

    cfg = tiny_moe_cfg
    torch.manual_seed(0)
    model = build_model(cfg.model)
    batch = build_eval_batches(cfg.data, "caption", rank=0, world_size=1, micro_batch_size=4, max_batches=1)[0]
    counts = collect_expert_counts(model, [batch])
    L, E = cfg.model.depth, cfg.model.moe.num_experts
    assert counts.shape == (L, E, 2)
    for l, m in enumerate(moe_layers(model)):
        np.testing.assert_array_equal(counts[l], m.last_counts_E2.numpy())
    n_img = int(batch.is_patch.sum())
    assert (counts[..., 1].sum(-1) == n_img).all() and (counts.sum((1, 2)) == batch.tokens.numel()).all()
    assert (counts.sum(-1) > 0).all()  # every expert used: moe_metrics and we then agree exactly
    assert moe_metrics(model)["moe/specialization"] == pytest.approx(float(specialization_score(counts).mean()))

    pad = load_tokenizer(cfg.data).pad_id
    n_pad = int(((batch.tokens == pad) & ~batch.is_patch).sum())
    no_pad = collect_expert_counts(model, [batch], pad_id=pad)
    assert n_pad > 0 and (no_pad.sum((1, 2)) == batch.tokens.numel() - n_pad).all()
    np.testing.assert_array_equal(no_pad[..., 1], counts[..., 1])  # padding is never a patch


def test_tool_end_to_end_on_a_tiny_moe_checkpoint(tmp_path, tiny_demo, capsys):
    run_dir = tmp_path / "run"
    train = subprocess.run(
        [PYTHON, "-m", "pretrain.train", "--config", MOE_CONFIG, *TINY_OVERRIDES, f"run.dir={run_dir}",
         f"data.root={tiny_demo}", "train.max_steps=2", "train.global_batch_size=2", "train.eval_batches=1"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-2000:]
    tag = run_dir / "checkpoints" / "step_00000002"
    assert (tag / "COMPLETE").is_file()

    # The command line, in this process (a second interpreter would only add start-up time).
    out = tmp_path / "spec"
    tool = _load_tool()
    assert tool.main(["--checkpoint", str(run_dir), "--data", str(tiny_demo), "--batches", "2",
                      "--device", "cpu", "--out", str(out)]) == 0
    assert "score per layer" in capsys.readouterr().out
    res = json.loads((out / "specialization.json").read_text())
    L, E = 2, 8
    assert res["checkpoint"] == str(tag) and res["step"] == 2 and (res["n_layers"], res["n_experts"]) == (L, E)
    assert set(res["sources"]) == {"caption", "interleaved", "text", "all"}
    for name, s in res["sources"].items():
        text, image = np.array(s["counts"]["text"]), np.array(s["counts"]["image"])
        assert text.shape == image.shape == (L, E)
        # top-1: every layer routes the same tokens, so the per-layer totals agree
        assert len(set(text.sum(1))) == 1 and len(set(image.sum(1))) == 1
        assert len(s["score"]) == L and all(v is None or 0 <= v <= 1 for v in s["score"])
        np.testing.assert_allclose(s["score"], specialization_score(np.stack([text, image], -1)), atol=1e-6)
        assert s["batches"] == (6 if name == "all" else 2)
    assert res["sources"]["text"]["tokens_per_layer"]["image"] == 0 and res["sources"]["text"]["score"] == [1.0] * L
    assert res["sources"]["caption"]["tokens_per_layer"]["image"] > 0
    all_counts = np.array(res["sources"]["all"]["counts"]["image"])
    np.testing.assert_array_equal(all_counts, sum(np.array(res["sources"][s]["counts"]["image"])
                                                  for s in ("caption", "interleaved", "text")))
    for png in ("expert_image_share.png", "specialization_score.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A tag directory gives the same counts (config.yaml found two levels up).
    from pretrain.scaling.specialization import analyse_checkpoint
    again = analyse_checkpoint(tag, data_root=str(tiny_demo), batches=2, sources=["caption"], device="cpu")
    np.testing.assert_array_equal(again.sources["caption"].counts[..., 1], res["sources"]["caption"]["counts"]["image"])
