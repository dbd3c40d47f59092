"""Where a model comes from: a training run, one checkpoint step, or a native export.

`load_source(PATH)` returns the run config, the step and the full fp32 state dict of the plain
(non-DeepSpeed) model, whatever PATH is:
  - a native export directory (`config.json` with `"format": "native-mm-pretrain"` beside
    `model.safetensors`),
  - a run directory (its newest complete checkpoint) or one `checkpoints/step_XXXXXXXX`
    directory, consolidated by `pretrain.checkpoint.load_consolidated` (dense ZeRO 0-3, MoE at
    any expert-parallel size, late fusion).
`load_model(PATH)` builds the module from it, in eval mode, without DeepSpeed.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from pretrain.config import RunConfig

NATIVE_FORMAT = "native-mm-pretrain"


@dataclass
class Source:
    config: RunConfig  # the run's config (model and data sections restored from an export)
    step: int  # optimizer step of the weights
    model_state: dict  # name -> fp32 CPU tensor, keys of build_model(config.model).state_dict()
    tokenizer_path: str | None  # sentencepiece model of the run, if it can be found
    path: str  # what was read


@dataclass
class LoadedModel:
    model: torch.nn.Module  # MultimodalDecoder in eval mode
    config: RunConfig
    step: int
    tokenizer_path: str | None


def is_native_export(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file() or not (Path(path) / "model.safetensors").is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == NATIVE_FORMAT
    except (json.JSONDecodeError, AttributeError):
        return False


def run_tokenizer_path(cfg: RunConfig) -> str | None:
    """The run's tokenizer: `data.tokenizer`, else the one named by `data.root`'s manifest."""
    if cfg.data.tokenizer:
        return cfg.data.tokenizer if os.path.isfile(cfg.data.tokenizer) else None
    manifest = Path(cfg.data.root) / "manifest.json"
    try:
        name = json.loads(manifest.read_text())["tokenizer"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return None
    path = Path(cfg.data.root) / name
    return str(path) if path.is_file() else None


def plain_model_config(cfg: RunConfig):
    """The model section for a single process: every expert local, nothing DeepSpeed-specific."""
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.moe.expert_parallel_size = 1
    model_cfg.activation_checkpointing = False
    return model_cfg


def build_from_state(cfg: RunConfig, state: dict, where: str, device="cpu",
                     dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """`build_model(cfg.model)` with `state` loaded strictly; errors name `where` and the keys."""
    from pretrain.models import build_model
    model = build_model(plain_model_config(cfg))
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{where}: weights do not fit a model.kind={cfg.model.kind} model built from its "
                         f"config: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                         f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    bad = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    if bad:
        raise ValueError(f"{where}: shape mismatch for {bad[0]}: stored {tuple(state[bad[0]].shape)}, "
                         f"the config gives {tuple(own[bad[0]].shape)}")
    model.load_state_dict(state, strict=True)
    return model.to(device=device, dtype=dtype).eval()
