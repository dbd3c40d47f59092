"""Measure the host sync of the expert-parallel MoE dispatch (pretrain/models/moe_dispatch.py).

Each MoE layer under expert parallelism reads its all-to-all split sizes on the host once per
forward (`SplitSizes.lists()`; why it is kept is in moe_dispatch.py). This spawns `--world`
ranks, builds one `MoEFFN` with expert_parallel_size = world (top-1 of 8 experts), runs `--steps`
forward+backward passes on `--tokens` tokens per rank, and reports per layer call: the time the
host spent waiting in `lists()` (the sync), the whole forward, and forward+backward, medians over
the steps after `--warmup` (rank 0's view; every rank syncs the same way).

On CPU (gloo) the counts are already on the host: the wait measures only the `.tolist()` and is
a lower bound. On GPUs (nccl) it is the real cost: the host waits for the router, the sort and
the count exchange to finish before it can queue the row exchange.

Run:
    python tools/bench_moe_dispatch.py                        # CPU, 2 gloo ranks, fp32
    python tools/bench_moe_dispatch.py --world 8 --backend nccl --width 1632 --tokens 16384   # 8 GPUs
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, args, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(args.backend, rank=rank, world_size=args.world)
    device = torch.device(f"cuda:{rank}") if args.backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(1)
    from pretrain.models import moe_dispatch
    from pretrain.models.config import MoEConfig, swiglu_hidden
    from pretrain.models.moe import MoEFFN

    waits = []
    lists = moe_dispatch.SplitSizes.lists

    def timed_lists(self):
        t0 = time.perf_counter()
        out = lists(self)
        waits.append(time.perf_counter() - t0)
        return out

    moe_dispatch.SplitSizes.lists = timed_lists
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    backend = "reference" if device.type == "cpu" else "triton"
    torch.manual_seed(0)
    layer = MoEFFN(args.width, swiglu_hidden(args.width), MoEConfig(num_experts=8, top_k=1, backend=backend),
                   expert_group=dist.group.WORLD).to(device, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fwd_s, step_s = [], []
    for step in range(args.warmup + args.steps):
        x = torch.randn(1, args.tokens, args.width, device=device, dtype=dtype, requires_grad=True)
        sync()
        dist.barrier()
        t0 = time.perf_counter()
        y = layer(x)
        sync()
        t1 = time.perf_counter()
        y.float().square().mean().backward()
        sync()
        t2 = time.perf_counter()
        if step >= args.warmup:
            fwd_s.append(t1 - t0)
            step_s.append(t2 - t0)
    waits = waits[args.warmup:]
    if rank == 0:
        queue.put(dict(wait_ms=1e3 * statistics.median(waits), fwd_ms=1e3 * statistics.median(fwd_s),
                       fwd_bwd_ms=1e3 * statistics.median(step_s), syncs_per_step=len(waits) / args.steps))
    dist.destroy_process_group()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args(argv)
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(args, _free_port(), queue), nprocs=args.world, start_method="spawn")
    r = queue.get()
    print(f"{args.backend}, {args.world} ranks, width {args.width}, {args.tokens} tokens/rank, "
          f"{r['syncs_per_step']:.0f} sync(s) per forward+backward: host wait for the split sizes "
          f"{r['wait_ms']:.3f} ms; layer forward {r['fwd_ms']:.2f} ms; forward+backward {r['fwd_bwd_ms']:.2f} ms "
          f"(medians over {args.steps} steps)")
    return r


if __name__ == "__main__":
    main()
