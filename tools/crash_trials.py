"""Crash trials: kill -9 a training run at random moments (some inside checkpoint saves), restart
it in the same run directory until it finishes, and compare every logged step with an
uninterrupted run of the same config.

    python tools/crash_trials.py --trials 5 --out /tmp/crash_trials            # 2 CPU ranks, tiny demo
    python tools/crash_trials.py --trials 3 --kills 3 --world 1 --steps 12

Each trial draws its kill moments from --seed: half of the kills happen at a random time after
start-up, half the moment a checkpoint directory without COMPLETE appears (a save in progress).
The whole process group (launcher and ranks) gets SIGKILL. A trial is "bitwise identical" when
every train record in its metrics.jsonl (including steps logged twice, before a kill and again
after the resume) has exactly the loss and gradient norm of the uninterrupted run at that step,
and the run finishes. Prints one line per trial and a summary; exit status 1 if any trial differs.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TINY = ["model.width=64", "model.depth=2", "model.head_dim=32", "data.seq_len=128", "train.micro_batch_size=2",
        "train.global_batch_size=8", "train.warmup_steps=2", "run.log_every=1", "run.wandb=false",
        "train.image_probe=false", "train.eval_every=1000", "train.save_every=2", "train.keep_checkpoints=2"]


def command(args, run_dir: Path) -> tuple[list[str], dict]:
    overrides = [*TINY, f"run.dir={run_dir}", f"data.root={args.data}", f"train.max_steps={args.steps}"]
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), WANDB_MODE="offline",
               PYTHON=sys.executable, CONFIG=args.config)
    if args.world == 1:
        return [sys.executable, "-m", "pretrain.train", "--config", args.config, *overrides], env
    env["NGPUS"] = str(args.world)
    return ["bash", str(REPO / "launch.sh"), *overrides], env


def run_once(args, run_dir: Path, kill: tuple[str, float] | None, log) -> str:
    """Start the run; kill it as `kill` says ("time", seconds) / ("save", 0). Returns how it ended."""
    cmd, env = command(args, run_dir)
    with open(log, "a") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        t0 = time.time()
        while proc.poll() is None:
            if time.time() - t0 > args.timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return "timeout"
            if kill is not None and _due(kill, t0, run_dir):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return f"killed ({kill[0]})"
            time.sleep(0.01)
    return "finished" if proc.returncode == 0 else f"failed ({proc.returncode})"


def _due(kill: tuple[str, float], t0: float, run_dir: Path) -> bool:
    if kill[0] == "time":
        return time.time() - t0 >= kill[1]
    # a save in progress: a step directory written to since this launch began, without COMPLETE
    # (one left incomplete by an earlier kill does not count)
    ckpts = run_dir / "checkpoints"
    return ckpts.is_dir() and any(not (p / "COMPLETE").exists() and _mtime(p) >= t0 for p in ckpts.glob("step_*"))


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # pruned meanwhile
        return 0.0


def train_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("type") == "train"]


def compare(reference: dict[int, dict], records: list[dict]) -> list[str]:
    diffs = []
    for r in records:
        ref = reference.get(r["step"])
        if ref is None or (r["loss"], r["grad_norm"]) != (ref["loss"], ref["grad_norm"]):
            diffs.append(f"step {r['step']}: loss {r['loss']!r} vs {None if ref is None else ref['loss']!r}")
    missing = set(reference) - {r["step"] for r in records}
    if missing:
        diffs.append(f"steps never logged: {sorted(missing)}")
    return diffs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--kills", type=int, default=2, help="kills per trial")
    p.add_argument("--steps", type=int, default=8, help="train.max_steps")
    p.add_argument("--world", type=int, default=2, help="ranks (2: ./launch.sh, 1: plain python)")
    p.add_argument("--config", default="pretrain/configs/demo.yaml")
    p.add_argument("--data", default="", help="data root (default: a tiny demo corpus made under --out)")
    p.add_argument("--out", default="runs/crash_trials")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-kill-s", type=float, default=40.0, help="random kills happen 3 s .. this after start")
    p.add_argument("--timeout", type=float, default=600.0, help="per launch")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not args.data:
        from tests.helpers import make_tiny_demo
        args.data = str(make_tiny_demo(out / "data"))
    rng = random.Random(args.seed)

    ref_dir = out / "reference"
    if not (ref_dir / "summary.json").is_file():
        end = run_once(args, ref_dir, None, out / "reference.log")
        if end != "finished":
            print(f"reference run {end}; see {out / 'reference.log'}", file=sys.stderr)
            return 2
    reference = {r["step"]: r for r in train_records(ref_dir)}

    identical = 0
    for trial in range(args.trials):
        run_dir = out / f"trial_{trial:02d}"
        log = out / f"trial_{trial:02d}.log"
        kills = [("save", 0.0) if rng.random() < 0.5 else ("time", rng.uniform(3.0, args.max_kill_s))
                 for _ in range(args.kills)]
        ends = [run_once(args, run_dir, k, log) for k in kills]
        for _ in range(args.kills + 3):  # then let it finish (a kill may have come after the end)
            if (run_dir / "summary.json").is_file():
                break
            ends.append(run_once(args, run_dir, None, log))
        diffs = compare(reference, train_records(run_dir))
        finished = (run_dir / "summary.json").is_file()
        same = finished and not diffs
        identical += same
        print(f"trial {trial}: kills {[f'{k[0]}@{k[1]:.1f}s' if k[0] == 'time' else 'in-save' for k in kills]}, "
              f"launches {ends}: {'bitwise identical' if same else 'DIFFERS: ' + '; '.join(diffs[:3])}", flush=True)
    print(f"{identical}/{args.trials} trials bitwise identical to the uninterrupted run "
          f"({len(reference)} steps each, every logged step compared)")
    return 0 if identical == args.trials else 1


if __name__ == "__main__":
    sys.exit(main())
