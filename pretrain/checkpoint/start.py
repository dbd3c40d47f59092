"""How a training run starts: resume its own newest checkpoint (on any layout), else start from
another run's weights (`train.init_from`), else from scratch. Called by pretrain/train.py once
the engine and the data loader exist; collective.

Resume on another world size also moves the data position (pretrain/data/world_change.py) and
the per-rank image-token count; one line on rank 0 says what was resharded.
"""
from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from pretrain.checkpoint.layout import CheckpointError


def _reshard_data(loader, cfg, clients: list[dict], rank: int, world: int) -> tuple[dict, str]:
    from pretrain.data.world_change import docs_per_epoch, reshard_loader_states

    states, summary = reshard_loader_states([c["loader"] for c in clients], world,
                                            micro_batch_size=cfg.train.micro_batch_size,
                                            docs_per_epoch=docs_per_epoch(cfg.data))
    loader.load_state_dict(states[rank])
    moved = ", ".join(f"{k} {v}" for k, v in summary["documents_handed_over"].items())
    text = (f"data position re-split over {world} ranks (documents handed over: {moved}; "
            f"{summary['buffered_pieces_moved']} buffered pieces moved")
    if summary["fill_remainders_dropped"]:
        text += f"; unused rest of {summary['fill_remainders_dropped']} fill documents dropped"
    return states[rank], text + ")"


def start(engine, loader, cfg, ckpt_root: Path, log=print) -> tuple[int, dict]:
    """Returns (step, this rank's client state: loader position, image_tokens_seen, ...)."""
    from pretrain.checkpoint.resume import resume_agreed

    rank, world = dist.get_rank(), dist.get_world_size()
    path, state = resume_agreed(engine, ckpt_root, cfg.model, log=log)
    if path is None:
        if cfg.train.init_from:
            init_from(engine, cfg, log=log)
        return 0, {}
    resharded = state.pop("resharded")
    if resharded is None:
        loader.load_state_dict(state["loader"])
        if rank == 0:
            log(f"[train] resumed from {path} at step {state['step']}")
        return int(state["step"]), state
    clients = resharded.pop("clients")
    before, now = resharded["from"], resharded["to"]
    what = [f"world size {before['world_size']} -> {now['world_size']}"]
    if before["ep_size"] != now["ep_size"]:
        what.append(f"expert-parallel size {before['ep_size']} -> {now['ep_size']}")
    what.append(f"ZeRO-{before['zero_stage']} -> ZeRO-{now['zero_stage']}: weights, fp32 master weights and "
                f"Adam moments resharded exactly, schedule and step kept")
    if before["world_size"] != world:
        _, data_text = _reshard_data(loader, cfg, clients, rank, world)
        what.append(data_text)
        # D_v (image tokens seen) is a sum over ranks: keep the old total, on rank 0
        state["image_tokens_seen"] = sum(int(c.get("image_tokens_seen", 0)) for c in clients) if rank == 0 else 0
    else:
        loader.load_state_dict(state["loader"])
    if rank == 0:
        log(f"[train] resumed from {path} at step {state['step']}, resharded: " + "; ".join(what))
    return int(state["step"]), state


def init_from(engine, cfg, log=print) -> None:
    """Weights of another run's checkpoint (any world size, ZeRO stage, expert-parallel size);
    the optimizer, schedule and data position stay fresh."""
    from pretrain.checkpoint.consolidated import load_consolidated
    from pretrain.checkpoint.elastic import load_weights

    try:
        ck = load_consolidated(cfg.train.init_from, config=cfg)
    except CheckpointError as e:
        raise CheckpointError(f"train.init_from: {e}") from None
    load_weights(engine, ck.model_state)
    if dist.get_rank() == 0:
        log(f"[train] initialised from the weights of {ck.path} (step {ck.step}); fresh optimizer, "
            f"schedule and data position")
