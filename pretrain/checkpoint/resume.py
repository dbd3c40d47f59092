"""Resuming: load one checkpoint into a freshly built engine, on the layout it was saved in or
(elastic.py) on another world size / expert-parallel size.

`load(engine, path)` restores weights, optimizer, schedule and step, and returns this rank's
client state. Same layout: DeepSpeed's own loader (bitwise exact). Other layout: the full state
is read from every rank's files and each rank takes its new share (elastic.py); the client
state then comes from the old rank with the same index (old rank 0 for ranks that did not exist),
and `client["resharded"]` says what changed, for the data loader to re-split its position.
"""
from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from pretrain.checkpoint.layout import CheckpointError, rank_file
from pretrain.checkpoint.rng import set_rng_state
from pretrain.checkpoint.safe_io import install_safe_engine, safe_load


def saved_layout(path: Path) -> dict:
    """world_size / zero_stage / ep_size the checkpoint was saved with (from rank 0's file)."""
    state = safe_load(rank_file(path, 0))
    return {"world_size": int(state.get("world_size", 0)), "zero_stage": state.get("zero_stage"),
            "ep_size": int(state.get("ep_size", 1))}


def load(engine, path: Path) -> dict:
    """Restore engine state from `path`; returns this rank's client state (step, loader, ...)."""
    from pretrain.checkpoint.save import layout_of

    path = Path(path)
    rank = dist.get_rank()
    now = layout_of(engine)
    before = saved_layout(path)
    install_safe_engine(engine)
    if before["world_size"] == now["world_size"] and before["ep_size"] == now["ep_size"]:
        state = safe_load(rank_file(path, rank))
        load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name)
        if load_path is None:
            raise CheckpointError(f"{path}: DeepSpeed could not load this checkpoint")
        state["resharded"] = None
    else:
        from pretrain.checkpoint.elastic import load_resharded
        load_resharded(engine, path)
        state = safe_load(rank_file(path, rank if rank < before["world_size"] else 0))
        state["resharded"] = {"from": before, "to": now}
    set_rng_state(state["rng"])
    return state
