"""Elastic resume: a checkpoint saved on one layout (world size, expert-parallel size) loaded
into an engine built for another, exactly: fp32 master weights, both Adam moments and Adam's step
are copied element for element into the new partitions; schedule and step counters are kept.

Why our own path rather than DeepSpeed's universal checkpoint: `ds_to_universal` does not cover
MoE checkpoints (deepspeed issue 5716) and needs an offline conversion step; here the full state
comes from zero_files.py (any stage, any expert-parallel size) and every rank writes its new
share directly:
- ZeRO 1/2: each parameter's fragment in this rank's flat fp32 partition (`_hp_mapping`: where
  the fragment starts in the parameter and in the partition) gets the matching slice of the full
  tensor, for the weights and for `exp_avg` / `exp_avg_sq` (created if the fresh optimizer has
  none yet); the module copy (full on every rank) is overwritten whole.
- ZeRO 3: each parameter owns `ceil(numel / world)` elements of this rank's partition
  (`grad_position`); the fp32 copy, both moments and the module's own shard (`ds_tensor`) get
  that slice of the zero-padded full tensor.
- ZeRO 0: DeepSpeed keeps the whole optimizer in one file that loads on any world size; only
  the engine counters and our per-rank state change (resume.py uses DeepSpeed's loader).
- MoE: an expert parameter is this rank's slice [e·E/ep, (e+1)·E/ep) of the full stacked tensor.
Cost: every rank reads the whole state once (about 12 bytes per parameter in host memory).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from pretrain.checkpoint.layout import CheckpointError
from pretrain.checkpoint.zero_files import MOMENTS, FullState, is_expert, plain_name, read_full_state


def _local(full: torch.Tensor, name: str, param_shape: torch.Size, module) -> torch.Tensor:
    """This rank's part of a full tensor: the expert slice for expert parameters, else all of it."""
    if tuple(full.shape) == tuple(param_shape):
        return full
    if is_expert(name):
        n_local = param_shape[0]
        ep_rank = _expert_rank(module, name)
        return full.narrow(0, ep_rank * n_local, n_local)
    raise CheckpointError(f"{name}: saved shape {tuple(full.shape)} does not fit the model's {tuple(param_shape)}")


def _expert_rank(module, name: str) -> int:
    layer = module.get_submodule(name.split(".deepspeed_moe.")[0])
    return int(layer.ep_rank)


def _full_params(engine, state: FullState, kinds=("weights",) + MOMENTS) -> list[tuple[torch.nn.Parameter, dict]]:
    """(parameter, {"weights"|"exp_avg"|"exp_avg_sq": this rank's full-shape tensor}) per parameter."""
    out = []
    missing = []
    for name, p in engine.module.named_parameters():
        key = plain_name(name)
        if key not in state.weights:
            missing.append(key)
            continue
        shape = p.ds_shape if hasattr(p, "ds_shape") else p.shape
        source = {"weights": state.weights, **state.moments}
        # a frozen parameter (requires_grad False) has weights only, no optimizer state
        vals = {kind: _local(source[kind][key], name, shape, engine.module)
                for kind in (kinds if p.requires_grad else ("weights",))}
        out.append((p, vals))
    if missing:
        raise CheckpointError(f"parameters missing from the checkpoint: {missing[:10]}")
    return out


def _adam_state(opt, flat: torch.Tensor, step: float) -> dict:
    st = opt.state[flat]
    for m in MOMENTS:
        if m not in st:
            st[m] = torch.zeros_like(flat)
    st["step"] = torch.tensor(float(step), dtype=torch.float32)
    return st


@torch.no_grad()
def _apply_zero12(engine, params, step: float | None) -> None:
    """step None: weights only (the optimizer keeps its fresh state)."""
    zopt = engine.optimizer
    states = [_adam_state(zopt.optimizer, flat, step) if step is not None else {}
              for flat in zopt.single_partition_of_fp32_groups]
    index = {id(p): i for i, group in enumerate(zopt.bit16_groups) for p in group}
    for p, vals in params:
        p.data.copy_(vals["weights"].to(p.dtype).view_as(p))
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:  # no fragment of this parameter in this rank's partition
            continue
        i = index[id(p)]
        lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
        targets = {"weights": zopt.single_partition_of_fp32_groups[i], **{m: states[i][m] for m in states[i]
                                                                           if m in MOMENTS}}
        for kind, flat in targets.items():
            flat.narrow(0, hp.start, hp.numel).copy_(vals[kind].flatten().narrow(0, lp.start, lp.numel))
    if step is not None:
        # DeepSpeed links each parameter to its moments after the first step (and in 0.19 does
        # so before later groups have state); link now that every group has.
        zopt._hp_optimizer_states_linked = False
        zopt._lazy_init_hp_params_optimizer_state()


@torch.no_grad()
def _apply_zero3(engine, params, step: float | None) -> None:
    """step None: weights only (the optimizer keeps its fresh state)."""
    zopt = engine.optimizer
    world = zopt.partition_count if isinstance(zopt.partition_count, int) else zopt.partition_count[0]
    for flat in zopt.fp32_partitioned_groups_flat if step is not None else []:
        _adam_state(zopt.optimizer, flat, step)
    for p, vals in params:
        part = math.ceil(p.ds_numel / world)
        if not p.requires_grad:  # frozen: only the module's own shard, no fp32 copy
            flat_full = torch.zeros(part * world, dtype=torch.float32)
            flat_full[:p.ds_numel] = vals["weights"].flatten()
            p.ds_tensor.data.copy_(flat_full.narrow(0, part * _z3_rank(zopt, p), p.ds_tensor.numel())
                                   .to(p.ds_tensor.dtype))
            continue
        my_rank = _z3_rank(zopt, p)
        for kind in vals:
            flat_full = torch.zeros(part * world, dtype=torch.float32)
            flat_full[:p.ds_numel] = vals[kind].flatten()
            mine = flat_full.narrow(0, part * my_rank, part)
            target, _ = zopt._get_fp32_opt_state_partition(p, release_swap_buffers=True,
                                                            optim_state_key=None if kind == "weights" else kind)
            target.copy_(mine.narrow(0, 0, target.numel()))
            if kind == "weights":
                p.ds_tensor.data.copy_(mine.narrow(0, 0, p.ds_tensor.numel()).to(p.ds_tensor.dtype))


def _z3_rank(zopt, p) -> int:
    if hasattr(zopt, "_get_param_partition_rank"):
        return zopt._get_param_partition_rank(p)
    return torch.distributed.get_rank(zopt.dp_process_group)


def apply_full_state(engine, state: FullState) -> None:
    """Write a full state into this rank's partitions of `engine` (ZeRO 1-3)."""
    stage = int(engine.zero_optimization_stage())
    if state.zero_stage == 0 or not state.moments:
        raise CheckpointError("a checkpoint saved without ZeRO keeps its optimizer in DeepSpeed's own format; "
                              "resume it with train.zero_stage=0")
    if state.adam_step is None:
        raise CheckpointError("the checkpoint holds no Adam step count")
    params = _full_params(engine, state)
    if stage in (1, 2):
        _apply_zero12(engine, params, state.adam_step)
    elif stage == 3:
        _apply_zero3(engine, params, state.adam_step)
    else:
        raise CheckpointError(f"ZeRO stage {stage}: resharding is not needed (DeepSpeed's file loads on any "
                              f"world size)")
    _restore_counters(engine, state.meta)


@torch.no_grad()
def load_weights(engine, weights: dict[str, torch.Tensor]) -> None:
    """Only the weights (plain model names, all experts) into any engine: `train.init_from`."""
    from deepspeed.utils import safe_set_full_fp32_param

    params = _full_params(engine, FullState(weights=weights), kinds=("weights",))
    stage = int(engine.zero_optimization_stage())
    if stage == 3:
        _apply_zero3(engine, params, None)
    elif stage in (1, 2):
        _apply_zero12(engine, params, None)
    else:
        for p, vals in params:
            p.data.copy_(vals["weights"].to(p.dtype).view_as(p))
            if getattr(p, "_hp_mapping", None) is not None:  # bf16 optimizer's fp32 copy
                safe_set_full_fp32_param(p, vals["weights"])


def _restore_counters(engine, meta: dict) -> None:
    """Schedule and step counters, as DeepSpeed's own loader sets them."""
    sched = engine.lr_scheduler
    if sched is not None and meta.get("lr_scheduler"):
        sched.load_state_dict(meta["lr_scheduler"])
        for group, lr in zip(engine.optimizer.param_groups, sched.get_last_lr()):
            group["lr"] = lr
    engine.global_steps = int(meta.get("global_steps", 0))
    engine.global_samples = int(meta.get("global_samples", 0))
    engine.skipped_steps = int(meta.get("skipped_steps", 0))


def load_resharded(engine, path: Path, state: FullState | None = None) -> FullState | None:
    """Read `path` (unless `state` is given) and load it into `engine` on its current layout."""
    if int(engine.zero_optimization_stage()) == 0:
        if state is not None and state.zero_stage != 0:
            raise CheckpointError(f"{path}: saved with ZeRO-{state.zero_stage}; resuming it without ZeRO "
                                  f"(train.zero_stage=0) is not supported, use a ZeRO stage 1-3")
        from pretrain.checkpoint.safe_io import install_safe_engine
        install_safe_engine(engine)
        load_path, _ = engine.load_checkpoint(str(Path(path).parent), tag=Path(path).name)
        if load_path is None:
            raise CheckpointError(f"{path}: DeepSpeed could not load this checkpoint")
        return state
    state = read_full_state(path) if state is None else state
    apply_full_state(engine, state)
    return state
