"""Does a checkpoint fit the model a config builds? Names every differing key.

The config's model is built on the meta device (shapes only, no memory, no init), so the check
costs nothing even for the paper's largest models. Checkpoint shapes come from DeepSpeed's
`param_shapes` record (no optimizer file is read); an MoE's stacked experts count every
expert-parallel rank's slice.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from pretrain.checkpoint.layout import CheckpointError
from pretrain.checkpoint.safe_io import safe_load
from pretrain.checkpoint.zero_files import is_expert, plain_name


def model_shapes(model_cfg) -> dict[str, torch.Size]:
    """name -> shape of the plain model's `state_dict()` for a ModelConfig."""
    from pretrain.models import build_model

    with torch.device("meta"):
        model = build_model(model_cfg)
    return {k: v.shape for k, v in model.state_dict().items()}


def checkpoint_shapes(step_dir) -> dict[str, torch.Size]:
    """name -> full (all experts) shape of every parameter and buffer saved in a step directory."""
    step_dir = Path(step_dir)
    model_file = step_dir / "mp_rank_00_model_states.pt"
    if not model_file.is_file():
        z3 = sorted(step_dir.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"))
        if not z3:
            raise CheckpointError(f"{step_dir}: no DeepSpeed model state in it")
        model_file = z3[0]
    meta = safe_load(model_file)
    ep = expert_parallel_size(step_dir)
    shapes: dict[str, torch.Size] = {}
    for group in meta.get("param_shapes") or []:
        for name, shape in group.items():
            shape = torch.Size(shape)
            if is_expert(name):
                shape = torch.Size([shape[0] * ep, *shape[1:]])
            shapes[plain_name(name)] = shape
    for name, shape in (meta.get("frozen_param_shapes") or {}).items():
        shapes[plain_name(name)] = torch.Size(shape)
    if not shapes:  # ZeRO 0: no param_shapes record; the module holds every non-expert weight
        shapes = {plain_name(k): v.shape for k, v in meta["module"].items()}
        for f in step_dir.glob("layer_*_expert_0_mp_rank_00_model_states.pt"):
            for k, v in safe_load(f).items():
                shapes[plain_name(k)] = torch.Size([v.shape[0] * ep, *v.shape[1:]])
    for name in meta.get("buffer_names", []):
        shapes[plain_name(name)] = meta["module"][name].shape
    return shapes


def expert_parallel_size(step_dir: Path) -> int:
    """The expert-parallel size an MoE checkpoint was saved with (1 without experts)."""
    ranks = {int(re.match(r"layer_\d+_expert_(\d+)_", f.name).group(1))
             for f in step_dir.glob("layer_*_expert_*_mp_rank_00_model_states.pt")}
    return len(ranks) or 1


def shape_differences(saved: dict, expected: dict) -> list[str]:
    """Human-readable differences between two name -> shape maps (empty when they agree)."""
    out = [f"{k}: missing from the checkpoint" for k in sorted(set(expected) - set(saved))]
    out += [f"{k}: in the checkpoint but not in the model" for k in sorted(set(saved) - set(expected))]
    out += [f"{k}: checkpoint {tuple(saved[k])} vs config {tuple(expected[k])}"
            for k in sorted(set(saved) & set(expected)) if tuple(saved[k]) != tuple(expected[k])]
    return out


def check_fits(step_dir, model_cfg, saved: dict | None = None) -> None:
    """Raise a CheckpointError naming every key whose shape differs between the checkpoint and
    the model `model_cfg` builds (at most 20 listed, with the count)."""
    saved = checkpoint_shapes(step_dir) if saved is None else saved
    diffs = shape_differences(saved, model_shapes(model_cfg))
    if diffs:
        shown = "; ".join(diffs[:20]) + (f"; ... {len(diffs) - 20} more" if len(diffs) > 20 else "")
        raise CheckpointError(f"{step_dir}: the checkpoint does not fit the configured model "
                              f"({len(diffs)} keys differ): {shown}")
