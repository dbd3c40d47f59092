"""Held-out next-token loss per data source and their mean, for a loaded model, in one process
(the same numbers the training loop logs as `loss/<source>`, pretrain/evaluation.py)."""
from __future__ import annotations

import torch

from pretrain.evaluation import evaluate_sources


def heldout_loss(model: torch.nn.Module, run_cfg, batches: int, micro_batch_size: int) -> dict:
    """{"task": "heldout", "loss/<source>": ..., "loss/avg": ..., "batches": per source}."""
    from pretrain.data.loader import build_eval_batches
    from pretrain.data.shards import load_manifest

    manifest = load_manifest(run_cfg.data.root)
    sets, skipped = {}, []
    for source in run_cfg.data.sources:
        if not manifest.select(source, "val"):
            skipped.append(source)
            continue
        sets[source] = build_eval_batches(run_cfg.data, source, rank=0, world_size=1,
                                          micro_batch_size=micro_batch_size, max_batches=batches)
    if not sets:
        raise ValueError(f"{run_cfg.data.root}: no held-out (val) shards for any of {run_cfg.data.sources}")
    device = next(model.parameters()).device
    result = {"task": "heldout", **evaluate_sources(model, sets, run_cfg.data.sources, device),
              "batches": {s: len(b) for s, b in sets.items()}}
    if skipped:
        result["sources_without_val"] = skipped
    return result
