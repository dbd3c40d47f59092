"""Checkpoints: a damaged newest checkpoint never loses the run; resume falls back to the one before."""
import subprocess

from tests.helpers import PYTHON, REPO, TINY_OVERRIDES


def _train(run_dir, data_root, max_steps):
    r = subprocess.run([PYTHON, "-m", "pretrain.train", "--config", "pretrain/configs/demo.yaml",
                        *TINY_OVERRIDES, f"run.dir={run_dir}", f"data.root={data_root}",
                        f"train.max_steps={max_steps}", "train.save_every=2", "train.keep_checkpoints=3",
                        "train.eval_every=1000", "train.global_batch_size=2"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def test_damaged_newest_checkpoint_falls_back(tmp_path, tiny_demo):
    run_dir = tmp_path / "run"
    _train(run_dir, tiny_demo, 4)
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    assert [p.name for p in ckpts] == ["step_00000002", "step_00000004"]
    for f in ckpts[-1].rglob("*model_states.pt"):  # truncate the newest one's weights
        f.write_bytes(f.read_bytes()[:100])
    out = _train(run_dir, tiny_demo, 6)
    assert "cannot resume from" in out and "step_00000004" in out
    assert "resumed from" in out and "step_00000002 at step 2" in out
    assert (run_dir / "summary.json").is_file()
