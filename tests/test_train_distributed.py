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
