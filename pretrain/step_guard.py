"""Non-finite step safety: a step whose loss or gradients are not finite is not applied.

How each engine skips such a step:
  * ZeRO 1-3 and bf16 (DeepSpeed's own optimizer wrappers) already drop a step whose global
    gradient norm is inf/NaN, agreed over ranks, and count it in `engine.skipped_steps`.
  * ZeRO-0 in fp32 hands the plain torch optimizer to the engine, which would apply NaN. For it,
    `StepGuard.install` wraps `optimizer.step`: it clips (the engine's own clipping is turned off)
    and skips on a non-finite norm exactly like DeepSpeed's wrappers (same `overflow` attribute, so
    the engine counts the skip the same way).
  * A non-finite loss with finite gradients (e.g. an `inf` cross-entropy whose softmax gradient is
    still finite) is turned into NaN gradients on the device (`StepGuard.loss`), so the rules above
    cover it too, with no host synchronisation per micro-batch.

A skipped step consumes its data and advances the step counter and the learning-rate schedule (the
schedule stays a function of the step, so the run still ends with its full cool-down), but leaves
weights and optimizer state untouched. `train.max_skipped_steps` consecutive skips stop the run,
naming the first step of that streak. Before each save, `state_is_finite` checks every weight,
master weight and optimizer state on every rank, so no checkpoint ever holds non-finite values and
pruning (which keeps the newest complete ones) can never remove the last good checkpoint.

Tests plant NaN through the environment variable PRETRAIN_TEST_NAN, read once at start: a comma
list of steps (1-based), `N+` meaning step N and every later one, e.g. `PRETRAIN_TEST_NAN=2,5+`.
The last rank's loss is multiplied by NaN at those steps (so ranks must agree to skip). Unset, it
costs one integer comparison per micro-batch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

TEST_NAN_ENV = "PRETRAIN_TEST_NAN"


def parse_planted_steps(spec: str) -> tuple[frozenset[int], int | None]:
    """`"2,5+"` -> ({2}, 5): single steps and the first step of a persistent streak (or None)."""
    single, start = set(), None
    for item in filter(None, (s.strip() for s in spec.split(","))):
        try:
            if item.endswith("+"):
                start = int(item[:-1]) if start is None else min(start, int(item[:-1]))
            else:
                single.add(int(item))
        except ValueError:
            raise ValueError(f"{TEST_NAN_ENV}={spec!r}: expected steps like '3' or '5+', got {item!r}") from None
    return frozenset(single), start


@dataclass
class StopReason:
    """Why a run stopped before max_steps: written to summary.json as `stopped`."""
    kind: str  # "nonfinite_steps" | "nonfinite_state"
    step: int  # the step at which the run stopped
    first_bad_step: int
    message: str


class StepGuard:
    def __init__(self, max_skipped_steps: int, rank: int, world: int):
        self.max_skipped = max_skipped_steps
        self.skipped_total = 0  # in the run so far: DeepSpeed's counter, saved in checkpoints
        self.consecutive = 0
        self.first_bad: int | None = None  # first step of the current streak of skips
        self.last_skipped = False
        self._seen = 0  # engine.skipped_steps at the end of the previous step
        spec = os.environ.get(TEST_NAN_ENV, "")
        self._plant = parse_planted_steps(spec) if spec and rank == world - 1 else None

    # -- per micro-batch (device only) -----------------------------------------------------------
    def loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """The loss to back-propagate at 1-based `step`: NaN everywhere when it is not finite."""
        if self._plant is not None:
            single, start = self._plant
            if step in single or (start is not None and step >= start):
                loss = loss * float("nan")
        poison = torch.where(torch.isfinite(loss.detach()), 1.0, float("nan")).to(loss.dtype)
        return loss * poison

    # -- at the step boundary (host ints the engine already synchronised) --------------------------
    def install(self, engine) -> None:
        """Make ZeRO-0 fp32 skip non-finite steps like DeepSpeed's ZeRO/bf16 wrappers do.

        Call after resuming: the engine's skip counter comes back from the checkpoint."""
        self._seen = self.skipped_total = int(engine.skipped_steps)
        opt = engine.optimizer
        if hasattr(opt, "overflow"):  # a DeepSpeed wrapper: it already checks and skips
            return
        clip = float(engine.gradient_clipping() or 0.0)
        engine.clip_fp32_gradients = lambda: None  # clipped below, where the norm also decides
        inner_step = opt.step

        def guarded_step(closure=None):
            params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
            if clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(params, clip)
            else:
                norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            bad = (~torch.isfinite(norm)).to(torch.int32).reshape(1)
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # ZeRO-0 grads agree already; make sure
            opt.overflow = bool(bad.item())  # the one host sync, once per optimizer step
            if opt.overflow:
                opt._global_grad_norm = float("inf")
                opt.zero_grad(set_to_none=True)
                return None
            opt._global_grad_norm = float(norm)
            return inner_step(closure) if closure is not None else inner_step()

        guarded_step._wrapped_by_lr_sched = True  # torch's LR scheduler checks its own patch is kept
        opt.overflow = False
        opt.step = guarded_step

    def after_step(self, engine, step: int) -> StopReason | None:
        """Record whether `step` was applied; a StopReason once too many steps in a row were not."""
        now = int(engine.skipped_steps)
        self.last_skipped = now > self._seen
        self._seen = self.skipped_total = now
        if not self.last_skipped:
            self.consecutive, self.first_bad = 0, None
            return None
        self.consecutive += 1
        self.first_bad = self.first_bad or step
        if engine.lr_scheduler is not None:  # DeepSpeed holds the schedule on a skip; keep it on step
            engine.lr_scheduler.step()
        if self.consecutive < self.max_skipped:
            return None
        return StopReason("nonfinite_steps", step, self.first_bad,
                          f"{self.consecutive} consecutive steps had a non-finite loss or gradient "
                          f"(first at step {self.first_bad}, train.max_skipped_steps="
                          f"{self.max_skipped}); stopping, the last checkpoint is kept")


def _inner_optimizer(opt):
    """The torch optimizer holding the fp32 master weights and Adam moments behind DeepSpeed's wrappers."""
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


def _state_tensors(engine):
    for p in engine.module.parameters():
        yield p.detach()
    inner = _inner_optimizer(engine.optimizer)
    if isinstance(inner, torch.optim.Optimizer):
        for group in inner.param_groups:
            for p in group["params"]:
                yield p.detach()
                for v in inner.state.get(p, {}).values():
                    if torch.is_tensor(v) and v.is_floating_point():
                        yield v


def state_is_finite(engine, device) -> bool:
    """True when every weight, master weight and optimizer state is finite on every rank.

    A collective (all ranks call it, before a save); one host sync."""
    bad = torch.zeros((), dtype=torch.bool, device=device)
    for t in _state_tensors(engine):
        if t.numel():
            bad |= ~torch.isfinite(t).all().to(device)
    flag = bad.to(torch.int32).reshape(1)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return not bool(flag.item())


def nonfinite_state_stop(step: int) -> StopReason:
    return StopReason("nonfinite_state", step, step,
                      f"weights or optimizer state are not finite at step {step}; this step is not "
                      f"saved and the run stops (the last checkpoint is kept)")
