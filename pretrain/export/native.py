"""The native export: one directory that `pretrain` itself loads without DeepSpeed.

    DIR/model.safetensors   every parameter under our module's own names (all experts), fp32 by default
    DIR/config.json         {"format": "native-mm-pretrain", "format_version", "step",
                             "model": the run's model section, "data": its data section, "tokenizer"}
    DIR/tokenizer.model     the run's sentencepiece model

`export_native(source, DIR)` writes it; `load_exported(DIR)` gives the module back (eval mode).
Run:  python tools/export.py --checkpoint runs/demo --out exports/demo
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pretrain.export.source import NATIVE_FORMAT, Source, build_from_state, plain_model_config

FORMAT_VERSION = 1
TOKENIZER_FILE = "tokenizer.model"


def export_native(src: Source, out: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # Check the weights against the config before writing anything.
    build_from_state(src.config, src.model_state, src.path)
    tensors = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
               for k, v in src.model_state.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer = None
    if src.tokenizer_path:
        shutil.copyfile(src.tokenizer_path, out / TOKENIZER_FILE)
        tokenizer = TOKENIZER_FILE
    config = {"format": NATIVE_FORMAT, "format_version": FORMAT_VERSION, "step": src.step,
              "source": src.path, "dtype": str(dtype).replace("torch.", ""), "tokenizer": tokenizer,
              "model": dataclasses.asdict(plain_model_config(src.config)),
              "data": dataclasses.asdict(src.config.data)}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def read_export(path: str | Path) -> Source:
    """A native export directory as a `Source` (fp32 state, run config with model and data)."""
    from pretrain.config import ConfigError, RunConfig, _build
    from pretrain.data.config import DataConfig
    path = Path(path)
    meta = json.loads((path / "config.json").read_text())
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path}/config.json: format_version {meta['format_version']} is newer than this "
                         f"code reads ({FORMAT_VERSION}); update pretrain")
    # The data section only informs (image size, sequence length): keys this version does not
    # know are dropped rather than making an older or newer export unreadable.
    known = {f.name for f in dataclasses.fields(DataConfig)}
    data = {k: v for k, v in (meta.get("data") or {}).items() if k in known}
    try:
        cfg = _build(RunConfig, {"model": meta["model"], "data": data})
    except (ConfigError, KeyError) as e:
        raise ValueError(f"{path}/config.json: cannot rebuild the model config: {e}") from None
    state = {k: v.float() if v.is_floating_point() else v
             for k, v in load_file(str(path / "model.safetensors")).items()}
    tok = path / meta["tokenizer"] if meta.get("tokenizer") else None
    return Source(config=cfg, step=int(meta.get("step", 0)), model_state=state,
                  tokenizer_path=str(tok) if tok and tok.is_file() else None, path=str(path))


def load_exported(path: str | Path, device="cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The module of a native export, in eval mode; `model.cfg` is its ModelConfig and the
    tokenizer is `DIR/tokenizer.model` (see `pretrain.export.load_model` for both at once)."""
    src = read_export(path)
    return build_from_state(src.config, src.model_state, src.path, device, dtype)
