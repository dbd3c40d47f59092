"""Run metrics: `metrics.jsonl` (one JSON object per logged step and per evaluation), a console
line with throughput and ETA, wandb (offline unless configured online), and the loss-curve PNG.

Only rank 0 writes; other ranks get a logger whose methods do nothing. Every line is strict JSON:
a non-finite number is written as `null` and its key listed under `"nonfinite"` (e.g. a skipped
step's `grad_norm`). A resumed run first drops the lines logged after its checkpoint's step
(`truncate_after`), so each step appears once.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class MetricsLogger:
    def __init__(self, run_dir: Path, cfg_dict: dict, enabled: bool, max_steps: int, wandb_cfg: dict):
        self.enabled = enabled
        self.max_steps = max_steps
        self.path = run_dir / "metrics.jsonl"
        self._t0 = time.time()
        self._step0: int | None = None
        self._wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if wandb_cfg.get("enabled") and wandb_cfg.get("mode") != "disabled":
            try:
                import wandb
                os.environ.setdefault("WANDB_SILENT", "true")
                self._wandb = wandb.init(project=wandb_cfg["project"], name=wandb_cfg["name"],
                                         dir=str(run_dir), mode=wandb_cfg["mode"], config=cfg_dict,
                                         resume="allow", id=wandb_cfg["id"])
            except Exception as e:  # logging must never kill a training run
                print(f"[metrics] wandb disabled: {type(e).__name__}: {e}", flush=True)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = json_safe({k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k not in ("type", "nonfinite")}, step=record.get("step"))

    def console(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        if self._step0 is None:
            self._step0, self._t0 = step, time.time()
            eta = "?"
        else:
            rate = (time.time() - self._t0) / max(step - self._step0, 1)
            eta = _fmt_time(rate * (self.max_steps - step))
        parts = [f"step {step}/{self.max_steps}"]
        for key in ("loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
            if key in record and record[key] is not None:
                v = record[key]
                parts.append(f"{key} {v:.3e}" if key == "lr" else f"{key} {v:.4g}")
        parts.append(f"eta {eta}")
        print(" | ".join(parts), flush=True)

    def truncate_after(self, step: int, also_at_step: tuple[str, ...] = ()) -> int:
        """Drop records of steps after `step` (logged past the checkpoint a run resumes from), and
        those at `step` whose type is in `also_at_step` (about to be logged again).

        Lines cut by a crash go too. Returns how many records were dropped."""
        if not self.enabled or not self.path.is_file():
            return 0
        lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
        kept = []
        for ln in lines:
            try:
                rec = json.loads(ln)
            except json.JSONDecodeError:
                continue
            s = rec.get("step")
            if not isinstance(s, int) or s < step or (s == step and rec.get("type") not in also_at_step):
                kept.append(ln)
        if len(kept) != len(lines):
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(ln + "\n" for ln in kept))
            tmp.replace(self.path)
            print(f"[metrics] restarting at step {step}: dropped {len(lines) - len(kept)} metrics.jsonl "
                  f"lines that are logged again", flush=True)
        return len(lines) - len(kept)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()


def json_safe(record: dict) -> dict:
    """`record` with non-finite floats replaced by None and their keys listed under "nonfinite"."""
    bad = sorted(k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v))
    if not bad:
        return record
    out = {k: (None if k in bad else v) for k, v in record.items()}
    out["nonfinite"] = bad
    return out


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut by a crash
    return out


def plot_losses(run_dir: Path) -> Path | None:
    """Training loss and held-out losses per source against step, as `loss.png`."""
    records = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in records if r.get("type") == "train" and r.get("loss") is not None]
    evals = [r for r in records if r.get("type") == "eval"]
    if not train:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1.2, label="train", color="0.3")
    keys = sorted({k for r in evals for k in r if k.startswith("loss/")})
    for k in keys:
        pts = [(r["step"], r[k]) for r in evals if k in r]
        ax.plot(*zip(*pts), marker="o", ms=3, lw=1.2, label=f"held-out {k[5:]}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token, log scale)")
    ax.set_yscale("log")  # the first steps' drop would otherwise flatten everything after it
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = run_dir / "loss.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
