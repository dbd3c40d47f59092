"""Operator metrics logged with every training line: memory, time blocked on data, rank spread.

Keys added to each `type: train` record of metrics.jsonl (all over the log window):
  mem/gpu_peak_allocated_gb, mem/gpu_peak_reserved_gb  CUDA peak since the previous log line, max over ranks
  mem/rss_gb, mem/peak_rss_gb                          host resident memory now / process peak, max over ranks
  data_wait_s/min, data_wait_s/max                     seconds per step blocked in the loader, fastest and slowest rank
  step_time_s/min, step_time_s/max                     seconds per step, fastest and slowest rank
Everything is read on the host at the log step, which synchronises anyway; nothing per micro-batch
except two `perf_counter` calls around `next(loader)`.
"""
from __future__ import annotations

import resource
import sys
import time

import torch
import torch.distributed as dist

GB = 1024 ** 3


class DataWait:
    """Host time spent waiting for the next batch."""

    def __init__(self):
        self.seconds = 0.0

    def next(self, loader):
        t0 = time.perf_counter()
        batch = next(loader)
        self.seconds += time.perf_counter() - t0
        return batch


def _rss_bytes() -> tuple[float, float]:
    """(current, peak) resident set size of this process in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    try:
        with open("/proc/self/statm") as f:
            current = int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        current = peak
    return float(current), float(peak)


def memory_now(device: torch.device) -> dict[str, float]:
    """This rank's memory figures in GiB; the CUDA peaks are reset for the next window."""
    rss, peak_rss = _rss_bytes()
    out = {"mem/rss_gb": rss / GB, "mem/peak_rss_gb": peak_rss / GB}
    if device.type == "cuda":
        out["mem/gpu_peak_allocated_gb"] = torch.cuda.max_memory_allocated(device) / GB
        out["mem/gpu_peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / GB
        torch.cuda.reset_peak_memory_stats(device)
    return out


def over_ranks(maxima: dict[str, float], spreads: dict[str, float], device) -> dict[str, float]:
    """One collective: the max over ranks of `maxima`, and `name/min`, `name/max` of `spreads`."""
    keys_max, keys_spread = sorted(maxima), sorted(spreads)
    vals = [maxima[k] for k in keys_max] + [spreads[k] for k in keys_spread] + [-spreads[k] for k in keys_spread]
    t = torch.tensor(vals, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    v = t.tolist()
    out = dict(zip(keys_max, v[:len(keys_max)]))
    n = len(keys_max)
    for i, k in enumerate(keys_spread):
        out[f"{k}/max"] = v[n + i]
        out[f"{k}/min"] = -v[n + len(keys_spread) + i]
    return out


def window_metrics(device, t0: float, steps: int, data_wait_s: float) -> dict[str, float]:
    """The operator metrics of a log window that began at `time.time()` = t0 (a collective)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # so this rank's step time includes its queued work
    elapsed_s = time.time() - t0
    steps = max(steps, 1)
    return over_ranks(memory_now(device), {"step_time_s": elapsed_s / steps, "data_wait_s": data_wait_s / steps},
                      device)
