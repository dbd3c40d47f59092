"""Pieces shared by tools/bench_attention.py and tools/bench_moe.py: the timer and error metric.

Both benchmarks time on a GPU with `triton.testing.do_bench` and, in `--smoke` mode on CPU, run
every timed function once without reporting a time (no CPU figure is ever presented as a
benchmark). Not meant to be run.
"""
from __future__ import annotations

import torch


def make_timer(smoke: bool, warmup: int, rep: int):
    """timer(fn, grad_to_none=None) -> ms: the do_bench median on a GPU; under `smoke`, fn runs
    once and the time is NaN."""
    if smoke:
        def run_once(fn, grad_to_none=None):
            fn()
            return float("nan")
        run_once.smoke = True  # callers skip their warm-up calls: nothing to compile or tune
        return run_once
    from triton.testing import do_bench
    return lambda fn, grad_to_none=None: do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none,
                                                  return_mode="median")


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error of `got` against `ref`, in float64."""
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))
