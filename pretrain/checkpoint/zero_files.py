"""DeepSpeed's checkpoint files, of any ZeRO stage and expert-parallel size, read back as full
(unsharded) per-parameter tensors: fp32 master weights and Adam's two moments.

What DeepSpeed 0.19 writes in one step directory, and how each piece is put together again:
- ZeRO 0 (no partitioning): `mp_rank_00_model_states.pt["module"]` holds every weight in the
  training precision; with fp32 training that is the master copy itself.
- ZeRO 1/2: each data-parallel rank's `[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt`
  holds, per optimizer group, its contiguous slice of the group's flat fp32 vector
  (`single_partition_of_fp32_groups`), Adam's state for that slice, and `param_slice_mappings`:
  name -> (start, numel) of each parameter's fragment inside the slice. A parameter is the
  concatenation of its fragments in rank order.
- ZeRO 3: per rank `fp32_flat_groups` (one flat vector per sub-group, concatenated here) and
  Adam's state alike; every parameter contributes `ceil(numel / world)` elements to every rank, in
  the order of `param_shapes` (from the rank's `zero_pp_rank_<r>_mp_rank_00_model_states.pt`);
  the last rank's share ends in padding.
- MoE (pretrain/models/moe_parallel.py): an expert-parallel rank holds experts
  [e·E/ep, (e+1)·E/ep) as stacked tensors registered as DeepSpeed "local expert 0". Its ZeRO
  groups are partitioned over its expert-data-parallel group (global ranks e, e+ep, e+2ep, ...),
  so fragments are joined within that group, then the ep slices are concatenated along the
  expert dimension. The weights also sit in `layer_<l>_expert_<e>_mp_rank_00_model_states.pt`.

Names are those of the plain model (`build_model(cfg)` without an expert group): DeepSpeed's
expert slot `.deepspeed_moe.experts.deepspeed_experts.0.` becomes `.experts.`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pretrain.checkpoint.layout import CheckpointError
from pretrain.checkpoint.safe_io import safe_load

EXPERT_SLOT = ".deepspeed_moe.experts.deepspeed_experts."
MOMENTS = ("exp_avg", "exp_avg_sq")


def plain_name(name: str) -> str:
    """DeepSpeed's module name -> the plain model's (`module.` prefix and expert slot removed)."""
    name = name.removeprefix("module.")
    return re.sub(re.escape(EXPERT_SLOT) + r"\d+\.", ".experts.", name)


def is_expert(name: str) -> bool:
    return ".experts." in plain_name(name) and not name.endswith("router.weight")


@dataclass
class FullState:
    """One checkpoint as full tensors. `weights`: name -> fp32 master weight; `moments`:
    "exp_avg"/"exp_avg_sq" -> name -> fp32 tensor (empty when not read); `adam_step`: Adam's step
    count; `meta`: DeepSpeed's model-state record without the weights (lr_scheduler,
    global_steps, global_samples, skipped_steps, dp_world_size, ...); `zero_stage`, `world_size`
    and `ep_size` describe the layout it was saved in."""
    weights: dict[str, torch.Tensor]
    moments: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    adam_step: float | None = None
    meta: dict = field(default_factory=dict)
    zero_stage: int = 0
    world_size: int = 1
    ep_size: int = 1


def _files(step_dir: Path, pattern: str, regex: str) -> list[Path]:
    found = {int(re.search(regex, f.name).group(1)): f for f in step_dir.glob(pattern)}
    ranks = sorted(found)
    if ranks != list(range(len(ranks))):
        raise CheckpointError(f"{step_dir}: files {pattern} for ranks {ranks}: some rank's file is missing")
    return [found[r] for r in ranks]


def _optim_files(step_dir: Path) -> list[Path]:
    return _files(step_dir, "*zero_pp_rank_*_mp_rank_00_optim_states.pt", r"zero_pp_rank_(\d+)_")


def _stage(optim: dict) -> int:
    return int(optim["optimizer_state_dict"]["zero_stage"])


def read_full_state(step_dir, moments: bool = True) -> FullState:
    """Everything needed to rebuild the model and its optimizer on any layout (see the module
    docstring); `moments=False` skips Adam's state (weights only, e.g. for export)."""
    step_dir = Path(step_dir)
    model_file = step_dir / "mp_rank_00_model_states.pt"
    z3_model_files = sorted(step_dir.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"))
    if model_file.is_file():
        meta = safe_load(model_file)
    elif z3_model_files:
        meta = safe_load(_files(step_dir, "zero_pp_rank_*_mp_rank_00_model_states.pt",
                                r"zero_pp_rank_(\d+)_")[0])
    else:
        raise CheckpointError(f"{step_dir}: no DeepSpeed model state (mp_rank_00_model_states.pt) in it")
    if "module" not in meta:
        raise CheckpointError(f"{model_file}: not a DeepSpeed model state (no 'module' entry)")
    optim_files = _optim_files(step_dir)
    if not optim_files:
        state = _read_stage0(step_dir, meta)
    else:
        optims = [safe_load(f) for f in optim_files]
        stage = _stage(optims[0])
        if stage == 3:
            state = _read_stage3(step_dir, meta, optims, moments)
        elif stage in (1, 2):
            state = _read_stage12(step_dir, meta, optims, moments)
        else:
            raise CheckpointError(f"{optim_files[0]}: unknown ZeRO stage {stage}")
    state.meta = {k: v for k, v in meta.items() if k not in ("module", "optimizer")}
    return state


def _expert_files(step_dir: Path) -> dict[int, dict[int, Path]]:
    out: dict[int, dict[int, Path]] = {}
    for f in step_dir.glob("layer_*_expert_*_mp_rank_00_model_states.pt"):
        layer, ep_rank = map(int, re.match(r"layer_(\d+)_expert_(\d+)_", f.name).groups())
        out.setdefault(layer, {})[ep_rank] = f
    return out


def _read_stage0(step_dir: Path, meta: dict) -> FullState:
    weights = {plain_name(k): v.float() for k, v in meta["module"].items()}
    ep = 1
    for layer, by_rank in sorted(_expert_files(step_dir).items()):
        ranks = sorted(by_rank)
        ep = len(ranks)
        parts = [safe_load(by_rank[r]) for r in ranks]
        for key in parts[0]:
            keys = [re.sub(re.escape(EXPERT_SLOT) + r"\d+\.", f"{EXPERT_SLOT}{r}.", key) for r in ranks]
            weights[plain_name(key)] = torch.cat([p[k].float() for p, k in zip(parts, keys)], dim=0)
    optimizer = meta.get("optimizer")
    # Without ZeRO, DeepSpeed keeps torch's optimizer state (params by index) in this same file;
    # it loads on any world size, so nothing here needs it by name.
    return FullState(weights=weights, zero_stage=0, world_size=int(meta.get("dp_world_size", 1)), ep_size=ep,
                     adam_step=None if not optimizer else _torch_adam_step(optimizer))


def _torch_adam_step(optimizer: dict) -> float | None:
    for s in optimizer.get("state", {}).values():
        if "step" in s:
            return float(s["step"])
    return None


def _ep_size(world: int, partition_count: int) -> int:
    if world % partition_count:
        raise CheckpointError(f"partition count {partition_count} does not divide the world size {world}")
    return world // partition_count


def _read_stage12(step_dir: Path, meta: dict, optims: list[dict], want_moments: bool) -> FullState:
    world = len(optims)
    counts = optims[0]["optimizer_state_dict"]["partition_count"]
    counts = counts if isinstance(counts, list) else [counts] * len(
        optims[0]["optimizer_state_dict"]["single_partition_of_fp32_groups"])
    keys = ("weights",) + (MOMENTS if want_moments else ())
    # (kind, plain name, ep rank) -> fragments in rank order
    frags: dict[tuple[str, str, int], list[torch.Tensor]] = {}
    shapes: dict[str, torch.Size] = {}
    for group_shapes in meta["param_shapes"]:
        for name, shape in group_shapes.items():
            shapes[plain_name(name)] = torch.Size(shape)
    ep_size, step = 1, None
    for rank, optim in enumerate(optims):
        osd = optim["optimizer_state_dict"]
        base = osd["base_optimizer_state"]
        for g, mapping in enumerate(osd["param_slice_mappings"]):
            ep = _ep_size(world, counts[g])
            ep_size = max(ep_size, ep)
            sources = {"weights": osd["single_partition_of_fp32_groups"][g]}
            gstate = base["state"].get(g, {})
            for m in MOMENTS if want_moments else ():
                if m not in gstate:
                    raise CheckpointError(f"{step_dir}: rank {rank}'s optimizer has no {m} for group {g}")
                sources[m] = gstate[m]
            if "step" in gstate:
                step = float(gstate["step"])
            for name, addr in mapping.items():
                for kind in keys:
                    frags.setdefault((kind, plain_name(name), rank % ep if is_expert(name) else 0), []).append(
                        sources[kind].narrow(0, addr.start, addr.numel))
    out: dict[str, dict[str, torch.Tensor]] = {k: {} for k in keys}
    by_name: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for (kind, name, ep_rank), parts in frags.items():
        if name not in shapes:
            raise CheckpointError(f"{step_dir}: parameter {name} is in the optimizer state but not in "
                                  f"param_shapes")
        by_name.setdefault((kind, name), {})[ep_rank] = torch.cat(parts).float().view(shapes[name])
    for (kind, name), slices in by_name.items():
        ranks = sorted(slices)
        out[kind][name] = slices[0] if len(ranks) == 1 else torch.cat([slices[r] for r in ranks], dim=0)
    missing = sorted(set(shapes) - set(out["weights"]))
    if missing:
        raise CheckpointError(f"{step_dir}: no optimizer fragment for {missing[:5]}")
    _add_buffers(out["weights"], meta)
    for name in meta.get("frozen_param_shapes") or {}:  # not trained: whole in the module state
        out["weights"][plain_name(name)] = meta["module"][name].float()
    return FullState(weights=out["weights"], moments={m: out[m] for m in keys[1:]}, adam_step=step,
                     zero_stage=_stage(optims[0]), world_size=world, ep_size=ep_size)


def _read_stage3(step_dir: Path, meta: dict, optims: list[dict], want_moments: bool) -> FullState:
    world = len(optims)
    names = [(plain_name(n), torch.Size(s)) for group in meta["param_shapes"] for n, s in group.items()]
    keys = ("weights",) + (MOMENTS if want_moments else ())
    flats: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    step = None
    for rank, optim in enumerate(optims):
        osd = optim["optimizer_state_dict"]
        flats["weights"].append(torch.cat([t.float().flatten() for t in osd["fp32_flat_groups"]]))
        base = osd["optimizer_state_dict"]["state"]
        for m in keys[1:]:
            flats[m].append(torch.cat([base[i][m].float().flatten() for i in sorted(base)]))
        if base:
            step = float(base[sorted(base)[0]]["step"])
    out: dict[str, dict[str, torch.Tensor]] = {k: {} for k in keys}
    offset = 0
    for name, shape in names:
        numel = shape.numel()
        part = math.ceil(numel / world)
        for kind in keys:
            full = torch.cat([flats[kind][r].narrow(0, offset, part) for r in range(world)])
            out[kind][name] = full[:numel].view(shape).clone()
        offset += part
    avail = flats["weights"][0].numel()
    if offset > avail:
        raise CheckpointError(f"{step_dir}: ZeRO-3 partitions hold {avail} elements per rank, the parameters "
                              f"need {offset}")
    _add_buffers(out["weights"], meta)
    _add_frozen_zero3(step_dir, meta, out["weights"], world)
    return FullState(weights=out["weights"], moments={m: out[m] for m in keys[1:]}, adam_step=step,
                     zero_stage=3, world_size=world, ep_size=1)


def _add_frozen_zero3(step_dir: Path, meta: dict, weights: dict, world: int) -> None:
    """ZeRO-3 keeps each rank's partition of a frozen parameter in its own model-state file."""
    frozen = meta.get("frozen_param_shapes") or {}
    if not frozen:
        return
    files = _files(step_dir, "zero_pp_rank_*_mp_rank_00_model_states.pt", r"zero_pp_rank_(\d+)_")
    parts = [safe_load(f).get("frozen_param_fragments") or {} for f in files]
    for name, shape in frozen.items():
        shape = torch.Size(shape)
        full = torch.cat([p[name].float().flatten() for p in parts])
        weights[plain_name(name)] = full[:shape.numel()].view(shape).clone()


def _add_buffers(weights: dict, meta: dict) -> None:
    for name in meta.get("buffer_names", []):
        weights[plain_name(name)] = meta["module"][name].float() if meta["module"][name].is_floating_point() \
            else meta["module"][name]
