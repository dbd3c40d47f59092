"""Where checkpoints live and which ones count: tags, the COMPLETE marker, run dir vs step dir.

Layout: `RUN_DIR/checkpoints/step_00001200/` holds DeepSpeed's files, one `rank_XXXXX.pt` per rank
(our client state: step, data position, RNG), a copy of the run's `config.yaml`, and `COMPLETE`,
written last once every rank has finished. A checkpoint without `COMPLETE` (a job killed mid-save)
is ignored, so a crash never loses the previous good one.
"""
from __future__ import annotations

from pathlib import Path

COMPLETE = "COMPLETE"
CONFIG = "config.yaml"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with the path and the reason."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(path: Path, rank: int) -> Path:
    return Path(path) / f"rank_{rank:05d}.pt"


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.glob("step_*") if (p / COMPLETE).is_file())


def is_step_dir(path: Path) -> bool:
    path = Path(path)
    return path.name.startswith("step_") and any(path.glob("*model_states.pt"))


def resolve_step_dir(path) -> Path:
    """A run directory (its newest complete checkpoint), its `checkpoints/` folder, or one step
    directory -> the step directory. Clear error when there is none."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p}: not a directory (give a run directory or a checkpoint step directory)")
    if is_step_dir(p):
        if not (p / COMPLETE).is_file():
            raise CheckpointError(f"{p}: no {COMPLETE} marker: the save was interrupted; use an earlier step")
        return p
    for root in (p / "checkpoints", p):
        done = complete_checkpoints(root)
        if done:
            return done[-1]
    raise CheckpointError(f"{p}: no complete checkpoint (expected {p}/checkpoints/step_*/{COMPLETE})")


def run_config_path(step_dir: Path) -> Path | None:
    """The config saved with the checkpoint, else the run directory's (older checkpoints)."""
    step_dir = Path(step_dir)
    for cand in (step_dir / CONFIG, step_dir.parent.parent / CONFIG):
        if cand.is_file():
            return cand
    return None
