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
    """world_size / zero_stage / ep_size the checkpoint was saved with (rank 0's file; the
    expert-parallel size from DeepSpeed's per-rank expert files)."""
    from pretrain.checkpoint.shapes import expert_parallel_size

    state = safe_load(rank_file(path, 0))
    return {"world_size": int(state.get("world_size", 0)), "zero_stage": state.get("zero_stage"),
            "ep_size": expert_parallel_size(Path(path))}


def load(engine, path: Path, model_cfg=None) -> dict:
    """Restore engine state from `path` (any layout) on this rank alone, no agreement between
    ranks (tests, tools); returns this rank's client state (step, loader, ..., `resharded`)."""
    from pretrain.checkpoint.save import layout_of

    now = layout_of(engine)
    return _load_prepared(engine, Path(path), preflight(path, model_cfg, now), now)


def _files_for_rank(path: Path, rank: int, layout: dict) -> list[Path]:
    """The files DeepSpeed's loader reads on `rank` when the layout is unchanged."""
    ep = max(int(layout.get("ep_size") or 1), 1)
    files = [rank_file(path, rank)]
    files += [f for f in (path / "mp_rank_00_model_states.pt",
                          path / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt") if f.is_file()]
    files += sorted(path.glob(f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"))
    files += sorted(path.glob(f"layer_*_expert_{rank % ep}_mp_rank_00_model_states.pt"))
    return files


def preflight(path: Path, model_cfg, layout_now: dict) -> dict:
    """Read (and thereby check) everything this rank needs from `path` before any rank loads;
    raises CheckpointError on damage. Returns what the load reuses: the saved layout, the old
    ranks' client states when the world size changed, the full state when resharding."""
    from pretrain.checkpoint.shapes import check_fits

    path = Path(path)
    rank = dist.get_rank()
    before = saved_layout(path)
    if model_cfg is not None:
        check_fits(path, model_cfg)
    same = (before["world_size"] == layout_now["world_size"] and before["ep_size"] == layout_now["ep_size"]
            and before["zero_stage"] in (None, layout_now["zero_stage"]))
    out = {"before": before, "same": same, "full": None, "clients": None}
    if same:
        for f in _files_for_rank(path, rank, before):
            safe_load(f)
    else:
        from pretrain.checkpoint.zero_files import read_full_state
        if before["zero_stage"] != 0:
            out["full"] = read_full_state(path)
        out["clients"] = [safe_load(rank_file(path, r)) for r in range(before["world_size"])]
    return out


def _all_ok(ok: bool, message: str) -> tuple[bool, list[str]]:
    """Collective: True when every rank's `ok` is; the ranks' messages (rank order)."""
    messages: list = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    return all(m is None for m in messages), messages


def resume_agreed(engine, ckpt_root: Path, model_cfg, log=print) -> tuple[Path | None, dict]:
    """Collective: all ranks load the same, newest checkpoint that every rank can read.

    Rank 0's list of complete checkpoints is the candidate list. For each, newest first, every
    rank runs `preflight` (its files read with weights_only=True and the shapes checked) and the
    ranks exchange the outcome: if any rank failed, all fall back to the previous checkpoint
    together (rank 0 logs who failed and why). A checkpoint whose shapes do not fit the model is
    a config error: all ranks stop with the differing keys named. Failures during the load
    itself are exchanged the same way and stop every rank with one message. Returns (path, this
    rank's client state plus `resharded`), or (None, {}) when there is no checkpoint; raises
    CheckpointError when checkpoints exist but none can be read.
    """
    from pretrain.checkpoint.layout import complete_checkpoints
    from pretrain.checkpoint.save import layout_of

    rank = dist.get_rank()
    listing = [[str(p) for p in complete_checkpoints(ckpt_root)] if rank == 0 else None]
    dist.broadcast_object_list(listing, src=0)
    candidates = [Path(p) for p in listing[0]]
    now = layout_of(engine)
    reasons = []
    for path in reversed(candidates):
        try:
            pre, err = preflight(path, model_cfg, now), None
        except Exception as e:  # noqa: BLE001 - any failure to read it means: this rank cannot use it
            pre, err = None, f"{type(e).__name__}: {e}"
        ok, messages = _all_ok(err is None, err)
        shape_errors = [m for m in messages if m and "does not fit the configured model" in m]
        if shape_errors:
            raise CheckpointError(shape_errors[0].split(": ", 1)[1])
        if not ok:
            why = "; ".join(f"rank {r}: {m}" for r, m in enumerate(messages) if m)
            reasons.append(f"{path.name}: {why}")
            if rank == 0:
                log(f"[train] warning: cannot resume from {path} ({why}); all ranks fall back to the "
                    f"previous checkpoint")
            continue
        try:
            state, err = _load_prepared(engine, path, pre, now), None
        except Exception as e:  # noqa: BLE001 - reported to every rank below, then all stop
            state, err = None, f"{type(e).__name__}: {e}"
        ok, messages = _all_ok(err is None, err)
        if not ok:
            why = "; ".join(f"rank {r}: {m}" for r, m in enumerate(messages) if m)
            raise CheckpointError(f"{path}: loading failed after every rank had read it ({why}); stopping")
        return path, state
    if candidates:
        raise CheckpointError(f"no complete checkpoint in {ckpt_root} could be loaded by every rank: "
                              + " | ".join(reasons))
    return None, {}


def _load_prepared(engine, path: Path, pre: dict, now: dict) -> dict:
    rank = dist.get_rank()
    install_safe_engine(engine)
    if pre["same"]:
        state = safe_load(rank_file(path, rank))
        load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name)
        if load_path is None:
            raise CheckpointError(f"{path}: DeepSpeed could not load this checkpoint")
        state["resharded"] = None
    else:
        from pretrain.checkpoint.elastic import load_resharded
        load_resharded(engine, path, pre["full"])
        clients = pre["clients"]
        state = dict(clients[rank if rank < len(clients) else 0])
        state["resharded"] = {"from": pre["before"], "to": now, "clients": clients}
    set_rng_state(state["rng"])
    return state
