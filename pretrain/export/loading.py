"""One entry point from any saved model to a ready module: a training run directory (newest
complete checkpoint), one checkpoint step directory, or a native export.

    from pretrain.export import load_model
    loaded = load_model("runs/demo")      # LoadedModel(model, config, step, tokenizer_path)

Checkpoints are read through `pretrain.checkpoint.load_consolidated` (any ZeRO stage or
expert-parallel size, no DeepSpeed engine), exports through `pretrain.export.native.read_export`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pretrain.export.native import read_export
from pretrain.export.source import LoadedModel, Source, build_from_state, is_native_export, run_tokenizer_path


def load_source(path: str | Path) -> Source:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run, checkpoint or export directory")
    if is_native_export(path):
        return read_export(path)
    from pretrain.checkpoint import load_consolidated
    c = load_consolidated(path)
    return Source(config=c.config, step=int(c.step), model_state=c.model_state,
                  tokenizer_path=run_tokenizer_path(c.config), path=str(path))


def load_model(path: str | Path, device="cpu", dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A ready module from a run directory, a checkpoint step directory or a native export."""
    src = load_source(path)
    model = build_from_state(src.config, src.model_state, src.path, device, dtype)
    return LoadedModel(model=model, config=src.config, step=src.step, tokenizer_path=src.tokenizer_path)
