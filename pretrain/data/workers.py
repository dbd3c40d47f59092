"""Worker processes for the training loader (`DataConfig.num_workers` > 0), with exact resume.

    loader = build_train_loader(cfg, rank=0, world_size=1, micro_batch_size=8)  # cfg.num_workers=4
    batch = next(loader); state = loader.state_dict()   # same batches and state as num_workers=0

How the work is split. Every worker holds a full copy of the single-process loader (TrainLoader
or RowLoader) started from the same state, so every worker walks the same plan: the mixture,
the document order and best-fit packing, which need only token ids and image lengths (images
stay undecoded until a batch is built, `lazy_images.py`). Worker w of N builds batches
w, w + N, w + 2N, ... (decode, augment, patchify, lay out) and only plans the others
(`skip_next`). torch's DataLoader hands batches back in that round-robin order, so the stream of
batches is the single-process one, bitwise, for any N.

How the state is merged back. Each built batch travels with the loader state right after it (a
few integers and buffered-document references). The training process keeps the state of the
last batch it consumed: `state_dict()` is exactly what the single-process loader would report
at that point, whatever the workers have prefetched beyond it. Resuming from it with any N
(0 included) continues the same stream.

What the training process pays per batch: receiving ready tensors through shared memory
(and pinning them when a GPU is present); no per-document Python runs on its thread.

A worker that dies (OOM killer, a signal) ends iteration with an error naming the worker and
its pid, not a hang; an exception inside a worker (a bad shard) is re-raised with its traceback.
Run the tests: `python -m pytest -q tests/test_data_workers.py`.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pretrain.batch import PackedBatch


_ALIGN = 16  # bytes: every field's view starts aligned for its dtype


class _FlatBatch:
    """A PackedBatch as ONE uint8 buffer plus its layout: crossing the process boundary costs one
    shared-memory handle per batch instead of one per field (each is a socket round trip)."""

    def __init__(self, batch: PackedBatch):
        tensors = [(f.name, getattr(batch, f.name).contiguous()) for f in fields(PackedBatch)]
        self.layout, off = [], 0
        for name, t in tensors:
            self.layout.append((name, t.dtype, tuple(t.shape), off, t.numel() * t.element_size()))
            off += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
        if get_worker_info() is not None:  # allocated in shared memory: sending copies nothing
            self.buf = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(max(off, 1)))
        else:
            self.buf = torch.empty(max(off, 1), dtype=torch.uint8)
        buf_np = self.buf.numpy()  # numpy copies: torch's would wake its intra-op thread pool
        for (name, dtype, shape, o, n), (_, t) in zip(self.layout, tensors):
            if n:
                buf_np[o:o + n] = t.numpy().reshape(-1).view(np.uint8)

    def pin_memory(self) -> "_FlatBatch":  # torch DataLoader's pin thread calls this
        self.buf = self.buf.pin_memory()
        return self

    def unflatten(self) -> PackedBatch:
        return PackedBatch(**{name: self.buf[o:o + n].view(dtype).view(shape)
                              for name, dtype, shape, o, n in self.layout})


class DataWorkerError(RuntimeError):
    """A data worker process died or failed; the message names the worker."""


class _RoundRobin(IterableDataset):
    """Runs in each worker: the whole plan, building only this worker's share of the batches."""

    def __init__(self, make_loader: Callable[[], object], state: Optional[dict]):
        self.make_loader, self.state = make_loader, state

    def __iter__(self):
        info = get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        torch.set_num_threads(1)  # one core per worker: N workers use N cores, not N x all
        loader = self.make_loader()
        try:
            if self.state is not None:
                loader.load_state_dict(self.state)
            k = 0
            while True:
                if k % n == w:
                    batch = next(loader)
                    yield _FlatBatch(batch), loader.state_dict(), loader.last_stats, loader.last_keys
                else:
                    loader.skip_next()
                k += 1
        finally:
            loader.close()


class ProcessLoader:
    """The training loader's interface (iterator, state_dict, last_stats, last_keys, close) over
    `num_workers` worker processes, each running `make_loader()` (picklable for 'spawn')."""

    def __init__(self, make_loader: Callable[[], object], num_workers: int, *,
                 prefetch_factor: int = 2, pin_memory: Optional[bool] = None):
        if num_workers < 1:
            raise ValueError(f"ProcessLoader: num_workers must be >= 1, got {num_workers}")
        self.make_loader, self.num_workers = make_loader, num_workers
        self.prefetch_factor = prefetch_factor
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._state: Optional[dict] = None  # state after the last consumed batch (None: fresh)
        self._dl_iter = None
        self.last_stats: dict = {}
        self.last_keys: list[list[str]] = []

    def _start(self) -> None:
        dl = DataLoader(_RoundRobin(self.make_loader, self._state), batch_size=None,
                        num_workers=self.num_workers, prefetch_factor=self.prefetch_factor,
                        pin_memory=self.pin_memory, in_order=True)
        self._dl_iter = iter(dl)

    def __iter__(self):
        return self

    def __next__(self) -> PackedBatch:
        if self._dl_iter is None:
            self._start()
        try:
            flat, state, stats, keys = next(self._dl_iter)
        except RuntimeError as e:
            raise DataWorkerError(self._describe_failure(e)) from e
        self._state, self.last_stats, self.last_keys = state, stats, keys
        return flat.unflatten()

    def _describe_failure(self, e: Exception) -> str:
        workers = getattr(self._dl_iter, "_workers", [])
        dead = [f"worker {i} of {len(workers)} (pid {p.pid}, exit code {p.exitcode})"
                for i, p in enumerate(workers) if p.exitcode is not None]
        who = "; ".join(dead) if dead else f"one of {self.num_workers} workers"
        return (f"data loader failed: {who}: {e}. The run's completed checkpoints are intact; "
                f"resume restarts the workers (data.num_workers may change).")

    def state_dict(self) -> dict:
        if self._state is None:  # nothing consumed yet: the state a fresh loader starts from
            loader = self.make_loader()
            try:
                return loader.state_dict()
            finally:
                loader.close()
        return self._state

    def load_state_dict(self, d: dict) -> None:
        if self._dl_iter is not None:
            raise RuntimeError("ProcessLoader.load_state_dict: call it before the first batch")
        loader = self.make_loader()  # checked here, so a bad state fails in this process, clearly
        try:
            loader.load_state_dict(d)
        finally:
            loader.close()
        self._state = d

    def close(self) -> None:
        """Stop the worker processes (the loader is unusable afterwards)."""
        it, self._dl_iter = self._dl_iter, None
        if it is not None:
            it._shutdown_workers()
