"""Held-out evaluation: next-token loss per data source and their mean (the paper's three
validation losses and their average), and the demo's image-reading probe.

Both run on every rank over that rank's share of the held-out data and all-reduce sums, so the
numbers do not depend on the number of ranks beyond which examples each rank saw.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from pretrain.batch import PackedBatch


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


@torch.no_grad()
def evaluate_sources(model, eval_sets: dict[str, list[PackedBatch]], sources: list[str],
                     device: torch.device) -> dict[str, float]:
    """{"loss/<source>": mean CE over that source's held-out targets, "loss/avg": their mean}."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(len(sources), 2, dtype=torch.float64, device=device)  # [loss sum, count]
    for batches in eval_sets.values():
        for batch in batches:
            out = model(batch.to(device), return_token_loss=True)
            src = out.target_source.long()
            sums[:, 0].index_add_(0, src, out.token_loss.double())
            sums[:, 1].index_add_(0, src, torch.ones_like(out.token_loss, dtype=torch.float64))
    _all_reduce_sum(sums)
    model.train(was_training)
    result = {}
    for i, name in enumerate(sources):
        if name in eval_sets and sums[i, 1] > 0:
            result[f"loss/{name}"] = float(sums[i, 0] / sums[i, 1])
    if result:
        result["loss/avg"] = sum(result.values()) / len(result)
    return result


@torch.no_grad()
def caption_word_accuracy(model, batch: PackedBatch, boi_eoi: tuple[int, int], device: torch.device,
                          noise_seed: int | None = None) -> torch.Tensor:
    """Counts [colour correct, shape correct, examples] on caption documents "<image> a COLOUR SHAPE ...".

    The colour is the target of the first caption token after `<eoi>`, the shape the next one; the
    prediction is the argmax over the whole vocabulary. With `noise_seed`, the image patches are
    replaced by Gaussian noise of the same shape, which must bring accuracy to chance."""
    was_training = model.training
    model.eval()
    if noise_seed is not None:
        g = torch.Generator().manual_seed(noise_seed)
        batch = batch.with_patches(torch.randn(batch.patches.shape, generator=g) * batch.patches.std()
                                   + batch.patches.mean())
    batch = batch.to(device)
    out = model(batch, return_logits=True)
    model.train(was_training)
    target_mask_BT = batch.labels != -100
    preds_N = out.target_logits.argmax(-1)
    pred_BT = torch.full_like(batch.labels, -1)
    pred_BT[target_mask_BT] = preds_N
    eoi = boi_eoi[1]
    after_eoi_BT = torch.zeros_like(batch.is_patch)
    after_eoi_BT[:, 1:] = batch.tokens[:, :-1] == eoi
    after_eoi_BT &= ~batch.is_patch & target_mask_BT
    colour_pos = after_eoi_BT.nonzero(as_tuple=True)
    shape_pos = (colour_pos[0], colour_pos[1] + 1)
    colour_ok = (pred_BT[colour_pos] == batch.labels[colour_pos]).sum()
    shape_ok = (pred_BT[shape_pos] == batch.labels[shape_pos]).sum()
    return torch.stack([colour_ok, shape_ok, colour_ok.new_tensor(colour_pos[0].numel())]).double()
