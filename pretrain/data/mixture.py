"""Exact per-global-batch mixture: which source each row of each global batch comes from.

A global batch has G = world_size x grad_accum x micro_batch_size rows. Batch g gets
`quota_s(g)` rows of source s, chosen by largest remainder on the *deficits* of the whole run:
    target_s(g) = w_s * G * (g + 1),   quota = largest-remainder split of G on target_s - done_s.
When w_s * G are integers (e.g. 45/45/10 with G a multiple of 20) every global batch holds
exactly w_s * G rows of s; otherwise every batch holds floor or ceil of it and the run's
totals never drift from the weights by a row or more. Sources with weight 0 get no rows.

Inside the batch the rows are ordered by smooth weighted round-robin on the quotas, so every
micro-batch (a contiguous slice of G/(world x accum) rows) is itself close to the mixture. Slot
layout: micro-step a of rank r holds rows [(a * world + r) * mbs, ... + mbs).
Everything is a pure function of (weights, G, g), identical on every rank: no communication.
"""
from __future__ import annotations

import math


def batch_quotas(weights: list[float], rows: int, done: list[int], batches_done: int) -> list[int]:
    """Rows per source for global batch number `batches_done` (0-based), given rows done so far."""
    total = float(sum(weights))
    w = [x / total for x in weights]
    deficit = [w[s] * rows * (batches_done + 1) - done[s] if w[s] > 0 else 0.0 for s in range(len(w))]
    deficit = [max(0.0, d) for d in deficit]
    base = [min(int(math.floor(d + 1e-9)), rows) for d in deficit]
    while sum(base) > rows:  # only possible through float fuzz; trim the largest
        base[max(range(len(base)), key=lambda s: base[s])] -= 1
    left = rows - sum(base)
    # Largest fractional remainder first; ties by source order (deterministic).
    order = sorted((s for s in range(len(w)) if w[s] > 0), key=lambda s: (-(deficit[s] - base[s]), s))
    for s in order[:left]:
        base[s] += 1
    i = 0
    while sum(base) < rows:  # more rows than sources with a remainder: round-robin by weight
        base[order[i % len(order)]] += 1
        i += 1
    return base


def spread(quotas: list[int]) -> list[int]:
    """Smooth weighted round-robin: a source sequence with the given counts, evenly interleaved."""
    n = sum(quotas)
    given = [0] * len(quotas)
    out = []
    for t in range(1, n + 1):
        s = max(range(len(quotas)), key=lambda s: (quotas[s] * t / n - given[s], -s) if given[s] < quotas[s]
                else (-math.inf, 0))
        given[s] += 1
        out.append(s)
    return out


class MixtureSchedule:
    """Row sources for one rank: `next_micro_batch()` -> list of source indices (mbs long)."""

    def __init__(self, weights: list[float], *, world_size: int, rank: int, micro_batch_size: int,
                 grad_accum: int):
        self.weights, self.world_size, self.rank = list(weights), world_size, rank
        self.mbs, self.accum = micro_batch_size, grad_accum
        self.rows = world_size * grad_accum * micro_batch_size  # G
        self.micro_steps = 0  # micro-batches this rank has produced
        self.done = [0] * len(weights)  # rows per source in all global batches before the current one
        self._batch: list[int] | None = None  # source of every row of the current global batch

    def _current(self) -> list[int]:
        if self._batch is None:
            g = self.micro_steps // self.accum
            self._batch = spread(batch_quotas(self.weights, self.rows, self.done, g))
        return self._batch

    def next_micro_batch(self) -> list[int]:
        batch = self._current()
        a = self.micro_steps % self.accum
        start = (a * self.world_size + self.rank) * self.mbs
        out = batch[start:start + self.mbs]
        self.micro_steps += 1
        if self.micro_steps % self.accum == 0:  # global batch complete: fold it into the totals
            for s in batch:
                self.done[s] += 1
            self._batch = None
        return out

    def state_dict(self) -> dict:
        return {"micro_steps": self.micro_steps, "done": list(self.done)}

    def load_state_dict(self, d: dict) -> None:
        self.micro_steps, self.done, self._batch = int(d["micro_steps"]), [int(x) for x in d["done"]], None


def check_resume_config(who: str, saved: dict, mine: dict, what: str = "data config") -> None:
    """Exact resume needs the loader built from the same settings it was saved with: raise
    ValueError naming the first setting that differs. Shared by both loaders' load_state_dict."""
    for k, v in saved.items():
        if mine.get(k) != v:
            raise ValueError(f"{who}.load_state_dict: saved {k}={v!r} but this loader has "
                             f"{k}={mine.get(k)!r}; exact resume needs the same {what}")
