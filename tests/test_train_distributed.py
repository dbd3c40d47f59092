"""End to end through launch.sh on two DeepSpeed ranks (CPU, gloo): a ZeRO-2 run of a few steps,
and stop-and-resume giving losses identical to the uninterrupted run."""
import json

import pytest

from pretrain.metrics import read_metrics
from tests.helpers import REPO, TINY_OVERRIDES, run_launch

DEMO = str(REPO / "pretrain/configs/demo.yaml")
STEPS = 6


def _run(run_dir, data_root, extra=()):
    r = run_launch(DEMO, [*TINY_OVERRIDES, f"run.dir={run_dir}", f"data.root={data_root}",
                          f"train.max_steps={STEPS}", "train.eval_every=3", "train.save_every=100",
                          "train.zero_stage=2", *extra])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _losses(run_dir, kind="train"):
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["type"] == kind]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_demo):
    run_dir = tmp_path_factory.mktemp("full")
    r = _run(run_dir, tiny_demo)
    return run_dir, r


def test_two_rank_zero2_run(uninterrupted):
    run_dir, r = uninterrupted
    assert "world 2" in r.stdout
    train = _losses(run_dir)
    assert [x["step"] for x in train] == list(range(1, STEPS + 1))
    assert train[-1]["loss"] < train[0]["loss"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] and summary["step"] == STEPS
    assert set(summary["eval"]) == {"loss/caption", "loss/interleaved", "loss/text", "loss/avg"}
    assert (run_dir / "loss.png").stat().st_size > 0 and (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / f"step_{STEPS:08d}" / "COMPLETE").is_file()


def test_stop_and_resume_matches_uninterrupted(uninterrupted, tmp_path, tiny_demo):
    full_dir, _ = uninterrupted
    run_dir = tmp_path / "resumed"
    r1 = _run(run_dir, tiny_demo, ["train.stop_after_steps=3"])
    assert "stopping after 3 steps" in r1.stdout
    assert not (run_dir / "summary.json").exists()
    r2 = _run(run_dir, tiny_demo)
    assert "resumed from" in r2.stdout
    full, resumed = _losses(full_dir), _losses(run_dir)
    assert [x["step"] for x in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(full, resumed):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"], (a, b)
    assert [e["loss/avg"] for e in _losses(full_dir, "eval")] == [e["loss/avg"] for e in _losses(run_dir, "eval")]


@pytest.fixture(scope="module")
def sft_shards(tmp_path_factory, tiny_demo):
    """A small LLaVA-format set (the demo's SFT generator) ingested with the tiny demo's tokenizer."""
    from pretrain.data.ingest.driver import IngestConfig, run_ingest
    from pretrain.data.ingest.llava import read_llava
    from pretrain.sft.demo import make_demo_sft_data
    d = tmp_path_factory.mktemp("sft")
    paths = make_demo_sft_data(str(d / "raw"), n_train=120, n_val=4, n_text=10)
    stats = run_ingest([paths["train"]], IngestConfig(
        output=str(d / "shards"), tokenizer=str(tiny_demo / "tokenizer.model"), source="sft",
        val_fraction=0.1, val_min_docs=8, image_size=48, min_image_size=16, max_doc_tokens=120,
        image_tokens=18, progress=False), read_llava)
    assert stats.samples == 130 and not stats.skipped
    return d / "shards"


def _sft(run_dir, shards, init_from, extra=()):
    r = run_launch(str(REPO / "pretrain/configs/sft_demo.yaml"),
                   [*TINY_OVERRIDES, f"run.dir={run_dir}", f"data.root={shards}", f"train.init_from={init_from}",
                    "train.max_steps=4", "train.warmup_steps=1", "train.eval_every=2", "train.save_every=100",
                    *extra])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def test_sft_from_pretraining_trains_and_resumes_exactly(uninterrupted, sft_shards, tmp_path):
    """Issue "Supervised fine-tuning": a 2-rank SFT run started with train.init_from from a
    pretraining checkpoint trains (loss falls) and stop + resume equals the uninterrupted SFT."""
    pre_dir, _ = uninterrupted
    full = _sft(tmp_path / "full", sft_shards, pre_dir)
    assert "init_from" in full.stdout and "world 2" in full.stdout
    stopped = _sft(tmp_path / "resumed", sft_shards, pre_dir, ["train.stop_after_steps=2"])
    assert "stopping after 2 steps" in stopped.stdout
    _sft(tmp_path / "resumed", sft_shards, pre_dir)
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "resumed")
    assert [x["step"] for x in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x["loss"] == y["loss"] and x["grad_norm"] == y["grad_norm"], (x, y)
    assert a[-1]["loss"] < a[0]["loss"]
    assert _losses(tmp_path / "full", "eval")[-1]["loss/sft"] == _losses(tmp_path / "resumed", "eval")[-1]["loss/sft"]
