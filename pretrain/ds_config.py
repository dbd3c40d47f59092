"""The DeepSpeed config, generated from the YAML run config over a base in `ds_configs/`.

The base file (`ds_configs/zero<stage>.json`, or `train.ds_base`) holds what is DeepSpeed's own
business (ZeRO buckets, offload); batch sizes, accumulation, clipping and precision always come
from the run config so the two can never drift. `"auto"` anywhere is an error: a value DeepSpeed
guesses is a value nobody reviewed.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def _find_auto(node, path="") -> str | None:
    if isinstance(node, dict):
        for k, v in node.items():
            hit = _find_auto(v, f"{path}.{k}" if path else k)
            if hit:
                return hit
    elif isinstance(node, list):
        for i, v in enumerate(node):
            hit = _find_auto(v, f"{path}[{i}]")
            if hit:
                return hit
    elif isinstance(node, str) and node.strip().lower() == "auto":
        return path
    return None


def resolve_precision(precision: str) -> str:
    if precision != "auto":
        return precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def build_ds_config(cfg, world_size: int) -> dict:
    """DeepSpeed config dict for `cfg` (a RunConfig) on `world_size` data-parallel ranks."""
    t = cfg.train
    base_path = Path(t.ds_base) if t.ds_base else REPO_ROOT / "ds_configs" / f"zero{t.zero_stage}.json"
    if not base_path.is_file():
        raise ValueError(f"train.ds_base: DeepSpeed base config not found: {base_path}")
    try:
        base = json.loads(base_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"train.ds_base: {base_path} is not valid JSON: {e}") from None
    hit = _find_auto(base)
    if hit:
        raise ValueError(f"{base_path}: '{hit}' is \"auto\"; write the value (batch sizes come from the YAML)")
    ds = {k: v for k, v in base.items() if not k.startswith("_")}
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping", "bf16", "fp16", "optimizer", "scheduler"):
        if key in ds:
            raise ValueError(f"{base_path}: '{key}' must not be set in the base; it comes from the run config")
    per_step = t.micro_batch_size * world_size
    if t.global_batch_size % per_step:
        raise ValueError(f"train.global_batch_size={t.global_batch_size} is not divisible by "
                         f"train.micro_batch_size * world_size = {t.micro_batch_size} * {world_size}")
    stage = ds.setdefault("zero_optimization", {}).get("stage", t.zero_stage)
    if stage != t.zero_stage:
        raise ValueError(f"train.zero_stage={t.zero_stage} but {base_path} sets stage {stage}")
    ds.update({
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // per_step,
        "gradient_clipping": t.grad_clip,
        # check_grad_overflow: a bf16 step with a non-finite gradient is skipped, never applied
        # (pretrain/step_guard.py relies on it; it is DeepSpeed's default, stated so it stays on).
        "bf16": {"enabled": resolve_precision(t.precision) == "bf16", "check_grad_overflow": True},
    })
    return ds
