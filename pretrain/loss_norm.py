"""Global loss normalisation: an optimizer step minimises the mean cross-entropy over every text
target of the step, whichever micro-batch and rank holds it.

    loss_step = sum over all micro-batches m and ranks r of CE_sum(m, r)  /  N_step
    N_step    = number of text targets (labels != -100) in the step, all micro-batches, all ranks

Why: averaging each micro-batch over its own targets and then letting DeepSpeed average
micro-batches and ranks equally (a mean of micro-batch means) weights a target by 1 / (targets in
its micro-batch). Packed multimodal rows hold very different numbers of text targets (a caption
row is mostly patches), so the objective would depend on the micro-batch size, the accumulation
steps and the number of GPUs. torchtitan, OLMo-core and `transformers` (since its 2024
gradient-accumulation fix) normalise by the step's target count; so does this repo.

How, with no extra host sync per micro-batch:
- the training loop draws the step's `gas` micro-batches from the loader before the first
  forward; their targets are counted on the host copies, and one all_reduce per step (on the
  device, never read back by the host) gives `N_step`;
- each micro-batch hands DeepSpeed `CE_sum(m, r) * W / N_step` (W = data-parallel world size)
  with `engine.backward(..., scale_wrt_gas=False)`: DeepSpeed then neither divides by the
  accumulation steps nor is its gradient averaging over the W data-parallel ranks left in the
  result (it divides every gradient, expert ones included, by W: ZeRO 0-3 reduce the dense
  gradients over all W ranks and the expert gradients over the expert-data-parallel group, but
  divide both by W; see deepspeed/runtime/zero/stage_1_and_2.py `average_tensor`,
  runtime/engine.py `_reduce_expert_gradients`).
- The MoE auxiliary loss (load balancing + z-loss, pretrain/models/moe.py) keeps its own
  normalisation: a mean over its micro-batch's tokens and the layers, then an equal-weight mean
  over the step's micro-batches and ranks (it is handed over as `aux / gas`, averaged over ranks
  by DeepSpeed). It is a regulariser of the router per micro-batch, not a per-target loss.

The logged training loss is the same global mean (`LossMeter`): summed CE over the log window,
all ranks, divided by the window's text targets (micro-batches with a non-finite loss, which the
non-finite guard skips, are left out of both).

Try it:  python -m pytest tests/test_loss_norm.py -q   (2 ranks vs one process, same gradients)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from pretrain.batch import IGNORE_INDEX, PackedBatch


def count_targets(batch: PackedBatch) -> int:
    """Text targets of one micro-batch, counted on its (host) copy."""
    return int((batch.labels != IGNORE_INDEX).sum())


def global_target_count(local_targets: int, device) -> torch.Tensor:
    """`N_step`: the step's targets summed over ranks; stays on the device (fp64 scalar)."""
    n = torch.tensor(float(local_targets), dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(n, op=dist.ReduceOp.SUM)
    return n


def backward_loss(out, n_step: torch.Tensor, dp_world: int, gas: int) -> torch.Tensor:
    """The scalar one micro-batch hands to `engine.backward(..., scale_wrt_gas=False)`.

    `out` is a ModelOutput (`ce_loss` = mean CE over its `n_targets`); its CE sum is weighted by
    `dp_world / N_step` so that DeepSpeed's division by the data-parallel world size leaves
    `sum CE / N_step`; the auxiliary loss is divided by the accumulation steps (DeepSpeed's
    default treatment, which `scale_wrt_gas=False` switches off)."""
    ce_sum = out.ce_loss * out.n_targets.to(out.ce_loss.dtype)
    scale = (dp_world / n_step.clamp(min=1.0)).to(out.ce_loss.dtype)
    return ce_sum * scale + out.aux_loss / gas


@dataclass
class StepLoss:
    """What one optimizer step contributes to the logged losses (device tensors, detached).
    Micro-batches whose loss is not finite (a step the non-finite guard skips) are left out."""
    ce_sum: torch.Tensor  # this rank's summed CE over its finite micro-batches (fp64)
    aux_sum: torch.Tensor  # this rank's summed auxiliary loss over them (fp64)
    n_targets: torch.Tensor  # this rank's text targets in them (fp64)
    micro_batches: torch.Tensor  # how many of this rank's micro-batches were finite (fp64)


def forward_backward(engine, micro_batches: list[PackedBatch], device,
                     guard: Callable[[torch.Tensor], torch.Tensor] | None = None) -> StepLoss:
    """Forward and backward of one optimizer step's micro-batches, loss normalised by `N_step`.

    `guard` (e.g. pretrain/step_guard.py's `StepGuard.loss`) maps each micro-batch's loss to
    the one back-propagated. Calls `engine.step()` after every micro-batch but the last
    (DeepSpeed counts micro-steps there); the caller finishes the optimizer step with one more
    `engine.step()`. In between, the step's reduced gradients are complete
    (`deepspeed.utils.safe_get_full_grad`)."""
    gas = engine.gradient_accumulation_steps()
    if len(micro_batches) != gas:
        raise ValueError(f"forward_backward: got {len(micro_batches)} micro-batches, the engine "
                         f"accumulates {gas} per optimizer step")
    n_step = global_target_count(sum(count_targets(b) for b in micro_batches), device)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # ce, aux, targets, micro-batches
    for i, batch in enumerate(micro_batches):
        out = engine(batch.to(device, non_blocking=True))
        loss = backward_loss(out, n_step, engine.dp_world_size, gas)
        if guard is not None:
            loss = guard(loss)
        engine.backward(loss, scale_wrt_gas=False)
        if i < gas - 1:
            engine.step()
        ce = out.ce_loss.detach().double()
        row = torch.stack([ce * out.n_targets, out.aux_loss.detach().double(),
                           out.n_targets.double(), torch.ones_like(ce)])
        sums += torch.where(torch.isfinite(loss.detach()), row, 0.0)
    return StepLoss(*sums.unbind(0))


class LossMeter:
    """Accumulates `StepLoss`es on the device; `reduce()` (one collective) gives the window's
    mean CE over all its text targets, all ranks, and the mean auxiliary loss per micro-batch
    (nan when every micro-batch of the window was non-finite)."""

    def __init__(self, device):
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)

    def add(self, step: StepLoss) -> None:
        self.sums += torch.stack([step.ce_sum, step.aux_sum, step.n_targets, step.micro_batches])

    def reduce(self) -> tuple[float, float]:
        """(loss, aux_loss) over the window; every rank must call it."""
        total = self.sums.clone()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        ce, aux, n_targets, micro = total.tolist()
        if micro == 0:
            return float("nan"), float("nan")
        return ce / max(n_targets, 1.0), aux / micro
