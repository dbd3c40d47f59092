"""Writing a checkpoint: DeepSpeed's files, one client-state file per rank, the config, COMPLETE.

DeepSpeed keeps `client_state` from data-parallel rank 0 only, but every rank's loader and RNG
differ, hence `rank_XXXXX.pt`. Each rank file also records the layout it was saved in (world
size, ZeRO stage, expert-parallel size) so a resume can tell whether DeepSpeed's own loader
applies or the state must be resharded (pretrain/checkpoint/elastic.py). `COMPLETE` is written by
rank 0 after a barrier, i.e. after every rank's files exist; pruning never removes the newest
complete checkpoint.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain.checkpoint.layout import COMPLETE, CONFIG, complete_checkpoints, rank_file, tag_for
from pretrain.checkpoint.rng import rng_state


def layout_of(engine) -> dict:
    """The parallel layout an engine runs with (saved with every rank file)."""
    from deepspeed.utils import groups

    ep = 1
    if getattr(engine, "has_moe_layers", False):
        ep = max(int(name.removeprefix("ep_size_")) for name in groups._get_expert_parallel_group_dict())
    return {"world_size": dist.get_world_size(), "zero_stage": int(engine.zero_optimization_stage()),
            "ep_size": ep}


def save(engine, ckpt_root: Path, step: int, client_state: dict, keep: int, config=None) -> Path:
    """Save step `step` under `ckpt_root/step_XXXXXXXX`; keep the newest `keep` complete ones
    (keep <= 0: all); `config` (the RunConfig) is stored alongside. Collective: every rank calls it."""
    rank = dist.get_rank()
    path = Path(ckpt_root) / tag_for(step)
    path.mkdir(parents=True, exist_ok=True)
    (path / COMPLETE).unlink(missing_ok=True)  # re-saving a step: invalid until done again
    torch.save({"step": step, **layout_of(engine), "rng": rng_state(), **client_state}, rank_file(path, rank))
    engine.save_checkpoint(str(ckpt_root), tag=path.name, client_state={"step": step}, save_latest=True)
    if rank == 0 and config is not None:  # the config this checkpoint was trained with
        from pretrain.config import save_config
        save_config(config, path / CONFIG)
    dist.barrier()
    if rank == 0:
        (path / COMPLETE).write_text(f"step {step}\nworld_size {dist.get_world_size()}\n")
        for old in complete_checkpoints(ckpt_root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return path
