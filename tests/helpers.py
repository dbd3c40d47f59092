"""Shared test utilities: tiny demo data sets and hand-built batches."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def make_tiny_demo(root: Path, seed: int = 0) -> Path:
    """A small demo corpus (a few hundred documents) in `root`; returns root."""
    from pretrain.data.corpora.demo import DemoSizes, make_demo_data
    if not (root / "manifest.json").is_file():
        make_demo_data(str(root), seed=seed, verbose=False,
                       sizes=DemoSizes(caption=400, interleaved=120, text=120,
                                       shard_samples={"caption": 100, "interleaved": 30, "text": 30}))
    return root


TINY_OVERRIDES = [
    "model.width=64", "model.depth=2", "model.head_dim=32",
    "data.seq_len=128", "train.micro_batch_size=2", "train.global_batch_size=8",
    "train.warmup_steps=2", "run.log_every=1", "run.wandb=false", "train.image_probe=false",
    "train.eval_batches=2",
]


def run_launch(config: str, overrides: list[str], timeout: int = 600, env_extra: dict | None = None):
    """Run ./launch.sh with a config and overrides; returns the CompletedProcess."""
    env = dict(os.environ)
    env.update({"CONFIG": config, "PYTHON": PYTHON, "MASTER_PORT": str(_free_port())})
    env.update(env_extra or {})
    return subprocess.run(["bash", str(REPO / "launch.sh"), *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_workers(target, world: int, timeout: float = 300) -> str:
    """Run `target(rank, port, out_dir)` in `world` spawned processes (a gloo rendezvous on a free
    port) and wait; returns out_dir. Fails naming the ranks that hung or exited non-zero."""
    import tempfile
    import torch.multiprocessing as mp

    out_dir = tempfile.mkdtemp(prefix="workers_")
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=target, args=(r, port, out_dir)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)  # a hang in a collective shows up here
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not hung, f"ranks {hung} did not finish within {timeout} s (a hang in a collective?)"
    assert all(p.exitcode == 0 for p in procs), f"exit codes {[p.exitcode for p in procs]}"
    return out_dir
