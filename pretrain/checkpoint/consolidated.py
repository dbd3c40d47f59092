"""`load_consolidated(path)`: the full fp32 model state of any checkpoint, for tools that do not
train (export, evaluation, generation, analysis) and for `train.init_from`.

    from pretrain.checkpoint import load_consolidated
    ck = load_consolidated("runs/demo_moe")          # newest complete checkpoint of a run
    model = build_model(ck.config.model); model.load_state_dict(ck.model_state)

Works for dense ZeRO 0-3, the MoE at any expert-parallel size, and late fusion; files are read
with `torch.load(weights_only=True)`. The weights are DeepSpeed's fp32 master copy (not the
bf16 module copy), so nothing is lost to rounding.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pretrain.checkpoint.layout import CheckpointError, resolve_step_dir, run_config_path
from pretrain.checkpoint.shapes import check_fits
from pretrain.checkpoint.zero_files import read_full_state


@dataclass
class Consolidated:
    config: object  # the run's RunConfig (as saved with the checkpoint)
    step: int  # optimizer steps completed when it was saved
    model_state: dict[str, torch.Tensor]  # plain model's state_dict keys -> fp32 CPU tensors, all experts
    path: Path  # the step directory read


def load_run_config(step_dir: Path):
    from pretrain.config import load_config

    cfg_path = run_config_path(step_dir)
    if cfg_path is None:
        raise CheckpointError(f"{step_dir}: no config.yaml with the checkpoint or in its run directory")
    return load_config(cfg_path)


def load_consolidated(path, config=None) -> Consolidated:
    """`path`: a run directory (its newest complete checkpoint) or one step directory. `config`
    (a RunConfig) replaces the one saved with the run. Raises CheckpointError when the files are
    damaged, refused (not plain data) or do not fit the config's model (naming the keys)."""
    step_dir = resolve_step_dir(path)
    cfg = config if config is not None else load_run_config(step_dir)
    full = read_full_state(step_dir, moments=False)
    check_fits(step_dir, cfg.model, {k: v.shape for k, v in full.weights.items()})
    step = int(full.meta.get("global_steps", int(step_dir.name.split("_")[-1])))
    state = {k: v.float().contiguous() for k, v in full.weights.items()}
    return Consolidated(config=cfg, step=step, model_state=state, path=step_dir)
