"""A model ready to generate: the decoder with its tokenizer and image geometry, from a training
run, one checkpoint step, a native export, or a module already in memory.

    lm = load_for_generation("runs/demo")                # newest complete checkpoint of a run
    lm = load_for_generation("exports/demo", device="cuda", dtype=torch.bfloat16)
    lm = InferenceModel.from_run_config(model, run_cfg)   # in memory (tests, end of training)

Files are read by `pretrain.export.load_model` (checkpoints through
`pretrain.checkpoint.load_consolidated`: any ZeRO stage, any expert-parallel size), so MoE
models come back with every expert local and nothing here needs DeepSpeed or a process group.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class InferenceModel:
    """What `generate` needs besides the prompts."""
    model: torch.nn.Module  # a MultimodalDecoder (any family), all experts local
    tokenizer: object  # pretrain.data.tokenizer.Tokenizer
    image_size: int  # prompt images are centre-cropped and resized to this side (data.image_size)
    patch_size: int  # data.patch_size
    source: str = ""  # where it was loaded from
    step: int | None = None  # training step of the weights, when known
    config: object = None  # the run's RunConfig, when known

    @classmethod
    def from_run_config(cls, model: torch.nn.Module, cfg, tokenizer=None, source: str = "",
                        step: int | None = None) -> "InferenceModel":
        """`cfg` is the run's RunConfig; the tokenizer defaults to the run's (data.root)."""
        if tokenizer is None:
            from pretrain.data.loader import load_tokenizer
            tokenizer = load_tokenizer(cfg.data)
        return cls(model, tokenizer, cfg.data.image_size, cfg.data.patch_size, source, step, cfg)


def load_for_generation(path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        tokenizer_path: str | None = None) -> InferenceModel:
    """Load a run directory, a checkpoint step directory or a native export for generation."""
    from pretrain.data.tokenizer import Tokenizer
    from pretrain.export import load_model

    loaded = load_model(path, device=device, dtype=dtype)
    tok_path = tokenizer_path or loaded.tokenizer_path
    if not tok_path:
        raise ValueError(f"{path}: the run's tokenizer was not found (data.root "
                         f"{loaded.config.data.root!r} has no manifest with one); pass its .model file")
    return InferenceModel(loaded.model, Tokenizer(tok_path), loaded.config.data.image_size,
                          loaded.config.data.patch_size, source=str(path), step=loaded.step, config=loaded.config)
