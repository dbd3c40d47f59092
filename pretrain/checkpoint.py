"""Checkpoints: DeepSpeed engine state plus, per rank, the step, data position and RNG state.

Layout: `RUN_DIR/checkpoints/step_00001200/` holds DeepSpeed's files, one `rank_XXXXX.pt` per rank
(our client state: DeepSpeed keeps `client_state` from data-parallel rank 0 only, but every rank's
loader and RNG differ), and `COMPLETE`, written last once every rank has finished. A checkpoint
without `COMPLETE` (a job killed mid-save) is ignored on resume, so a crash never loses the
previous good one.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

COMPLETE = "COMPLETE"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.glob("step_*") if (p / COMPLETE).is_file())


def save(engine, ckpt_root: Path, step: int, client_state: dict, keep: int) -> Path:
    rank, world = dist.get_rank(), dist.get_world_size()
    path = ckpt_root / tag_for(step)
    path.mkdir(parents=True, exist_ok=True)
    (path / COMPLETE).unlink(missing_ok=True)  # re-saving a step: invalid until done again
    torch.save({"step": step, "world_size": world, "rng": rng_state(), **client_state},
               path / f"rank_{rank:05d}.pt")
    engine.save_checkpoint(str(ckpt_root), tag=path.name, client_state={"step": step}, save_latest=True)
    dist.barrier()
    if rank == 0:
        (path / COMPLETE).write_text(f"step {step}\nworld_size {world}\n")
        for old in complete_checkpoints(ckpt_root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return path


def load(engine, path: Path) -> dict:
    """Restore engine state from `path`; returns this rank's client state (step, loader, ...)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    rank_file = path / f"rank_{rank:05d}.pt"
    if not rank_file.is_file():
        raise RuntimeError(f"{path}: no state for rank {rank}; the checkpoint was saved with a different "
                           f"number of ranks than the {world} running now")
    state = torch.load(rank_file, weights_only=False)
    if state.get("world_size") != world:
        raise RuntimeError(f"{path}: saved with world size {state.get('world_size')}, running with {world}")
    load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name)
    if load_path is None:
        raise RuntimeError(f"{path}: DeepSpeed could not load this checkpoint")
    set_rng_state(state["rng"])
    return state
