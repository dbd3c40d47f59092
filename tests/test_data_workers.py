"""Loader worker processes (DataConfig.num_workers, pretrain/data/workers.py) change nothing.

Issue "The input pipeline keeps up with an H100": batches for 0, 1 and 2 worker processes are
bitwise equal, with the same state after every batch; a run stopped with 2 workers and resumed
with 1 continues the uninterrupted stream; a killed worker ends iteration with an error that
names it, within seconds, not a hang.
    .venv/bin/python -m pytest tests/test_data_workers.py -q
"""
import json
import os
import signal
import time

import pytest
import torch

from pretrain.batch import PackedBatch
from pretrain.data import DataConfig
from pretrain.data.loader import build_train_loader
from pretrain.data.workers import DataWorkerError, ProcessLoader

FIELDS = ["tokens", "patches", "is_patch", "doc_ids", "image_ids", "position_ids", "labels", "source_ids"]
KW = dict(rank=1, world_size=2, micro_batch_size=3, global_batch_size=12)


def _cfg(root, **kw) -> DataConfig:
    # Augmentation on (crop + flip seeds must not depend on which process decodes), tail filling on.
    d = dict(root=str(root), seq_len=96, image_size=16, patch_size=8, pack_buffer=8,
             fill_rows_of=["caption"], augment=True)
    d.update(kw)
    return DataConfig(**d)


def _same(a: PackedBatch, b: PackedBatch) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in FIELDS)


def _run(loader, n):
    out = []
    for _ in range(n):
        b = next(loader)
        out.append((b, json.loads(json.dumps(loader.state_dict())), loader.last_keys, loader.last_stats))
    loader.close()
    return out


def test_same_batches_and_states_for_0_1_2_workers(tiny_demo):
    n = 14  # past an epoch of the small sources at this micro-batch
    ref = _run(build_train_loader(_cfg(tiny_demo), **KW), n)
    assert sum(int(b.is_patch.sum()) for b, *_ in ref) > 0  # images really decoded
    for workers, threads in [(1, 0), (2, 0), (2, 2), (0, 2)]:
        loader = build_train_loader(_cfg(tiny_demo, num_workers=workers, decode_threads=threads), **KW)
        assert isinstance(loader, ProcessLoader) == (workers > 0)
        got = _run(loader, n)
        for i, ((a, sa, ka, ta), (b, sb, kb, tb)) in enumerate(zip(ref, got)):
            assert _same(a, b), (workers, threads, i)
            assert sa == sb and ka == kb and ta == tb, (workers, threads, i)


def test_stop_with_two_workers_resume_with_one(tiny_demo):
    want = [b for b, *_ in _run(build_train_loader(_cfg(tiny_demo), **KW), 16)]
    run = build_train_loader(_cfg(tiny_demo, num_workers=2), **KW)
    assert run.state_dict()["step"] == 0  # before any batch: a fresh loader's state
    for i in range(7):
        assert _same(next(run), want[i]), i
    state = json.loads(json.dumps(run.state_dict()))  # as a checkpoint stores it
    assert state["step"] == 7  # the consumed batch's state, not the workers' prefetch position
    run.close()
    for workers in (1, 0):
        new = build_train_loader(_cfg(tiny_demo, num_workers=workers), **KW)
        new.load_state_dict(state)
        for i in range(7, 16):
            assert _same(next(new), want[i]), (workers, i)
        new.close()


def test_bad_state_fails_in_the_training_process(tiny_demo):
    state = build_train_loader(_cfg(tiny_demo), **KW).state_dict()
    state["config"]["seed"] = 123
    loader = build_train_loader(_cfg(tiny_demo, num_workers=2), **KW)
    with pytest.raises(ValueError, match="seed"):
        loader.load_state_dict(state)


def test_killed_worker_is_named_not_a_hang(tiny_demo):
    loader = build_train_loader(_cfg(tiny_demo, num_workers=2), **KW)
    next(loader)
    victim = loader._dl_iter._workers[1]
    t0 = time.monotonic()
    # Two ways the death surfaces, both naming the worker's pid: our DataWorkerError (the next
    # batch cannot arrive), or torch's SIGCHLD handler, which raises RuntimeError("DataLoader
    # worker (pid N) is killed by signal") in the training thread wherever it is at that moment.
    with pytest.raises(RuntimeError, match=rf"worker.*pid\D*{victim.pid}") as err:
        os.kill(victim.pid, signal.SIGKILL)
        for _ in range(50):  # batches already prefetched may still arrive first
            next(loader)
    if isinstance(err.value, DataWorkerError):
        assert f"worker 1 of 2 (pid {victim.pid}" in str(err.value)
    assert time.monotonic() - t0 < 60  # DataLoader's liveness check, not a hang
    loader.close()
