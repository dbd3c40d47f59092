"""Issue 7, acceptance 4: tools/sweep.py -> training runs -> tools/collect_runs.py ->
tools/fit_scaling_laws.py, end to end on demo-sized runs of a few steps.

The runs are trained by pretrain.train in one subprocess (world size 1, DeepSpeed engine as in
production) rather than one `launch.sh` each, to keep the test within a minute or two."""
import csv
import json
import shlex
import subprocess

from tests.helpers import PYTHON, REPO

DRIVER = """
import sys
from pretrain.config import load_config
from pretrain.train import train
for line in open(sys.argv[1]):
    line = line.strip()
    if not line.startswith("CONFIG="):
        continue
    words = __import__("shlex").split(line)
    config = words[0].split("=", 1)[1]
    overrides = words[words.index("./launch.sh") + 1:]
    train(load_config(config, overrides))
"""


def _tool(*args, cwd=REPO):
    r = subprocess.run([PYTHON, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r


def test_sweep_collect_fit_end_to_end(tmp_path, tiny_demo):
    sweep = tmp_path / "sweep"
    _tool("tools/sweep.py", "--kind", "early", "--widths", "32,64,96", "--tokens", "2048,4096",
          "--base-config", "pretrain/configs/demo.yaml", "--global-batch-size", "4", "--seq-len", "128",
          "--set", f"data.root={tiny_demo}", "--set", "model.head_dim=32", "--set", "model.depth=2",
          "--set", "train.micro_batch_size=4", "--set", "run.wandb=false", "--set", "train.image_probe=false",
          "--set", "train.eval_batches=2", "--set", "train.eval_every=1000", "--set", "run.log_every=1",
          "--out", str(sweep), "--runs-root", str(tmp_path / "runs"))
    commands = (sweep / "commands.sh").read_text()
    assert commands.count("./launch.sh") == 6
    _tool("-c", DRIVER, str(sweep / "commands.sh"))

    run_dirs = sorted(p for p in (tmp_path / "runs" / "sweep").iterdir() if p.is_dir())
    assert len(run_dirs) == 6 and all((d / "summary.json").is_file() for d in run_dirs)
    runs_csv = tmp_path / "runs.csv"
    _tool("tools/collect_runs.py", *map(str, run_dirs), "--out", str(runs_csv))
    rows = list(csv.DictReader(runs_csv.open()))
    assert len(rows) == 6
    summaries = {d.name: json.loads((d / "summary.json").read_text()) for d in run_dirs}
    for row in rows:
        assert float(row["N"]) > 0 and float(row["D"]) in (2048.0, 4096.0)
        assert float(row["C"]) == 6 * float(row["N"]) * float(row["D"])
        matching = [s for s in summaries.values() if s["params"] == int(float(row["N"])) and s["tokens"] == int(float(row["D"]))]
        assert matching and float(row["loss"]) == matching[0]["eval"]["loss/avg"]

    out = tmp_path / "fit"
    _tool("tools/fit_scaling_laws.py", str(runs_csv), "--out", str(out), "--bootstrap", "5", "--no-holdout")
    fit = json.loads((out / "fit.json").read_text())
    text = json.dumps(fit)
    for key in ("E", "A", "B", "alpha", "beta", "a", "b", "d", "c"):
        assert f'"{key}"' in text, key
    assert (out / "report.md").is_file() and any(out.glob("*.png"))
    shlex.split(commands.splitlines()[-1])  # the commands are valid shell words
