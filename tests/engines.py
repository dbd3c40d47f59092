"""Test utilities for in-process DeepSpeed engines on two gloo ranks (CPU): tiny run configs,
synthetic batches, the engine train.py builds, and a spawner that never hangs the test session."""
from __future__ import annotations

import os
import socket

import torch

MICRO, SEQ = 2, 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_run_config(kind: str = "early", zero: int = 2, ep: int = 1, world: int = 2, gas: int = 2):
    """A RunConfig with a tiny model of `kind` whose images are 2x2 patches of 2x2 pixels."""
    from pretrain.config import RunConfig
    from pretrain.models.config import ModelConfig, MoEConfig, VisionConfig

    cfg = RunConfig()
    cfg.model = ModelConfig(kind=kind, vocab_size=64, width=32, depth=2, head_dim=16, patch_size=2,
                            image_size=4, attention_backend="reference",
                            vision=VisionConfig(width=16, depth=1, head_dim=8),
                            moe=MoEConfig(num_experts=4, top_k=1, expert_parallel_size=ep))
    cfg.data.patch_size, cfg.data.image_size = 2, 4
    t = cfg.train
    t.zero_stage, t.micro_batch_size, t.global_batch_size = zero, MICRO, MICRO * gas * world
    t.precision, t.lr, t.warmup_steps, t.max_steps = "fp32", 1e-2, 1, 10
    cfg.validate(world)
    return cfg


def synthetic_batch(rank: int, step: int, micro: int, text_only: bool = False):
    """A deterministic micro-batch per (rank, step, micro): one image span of 4 patches in row 0,
    unless text_only (then no image tokens at all)."""
    from pretrain.batch import PackedBatch

    g = torch.Generator().manual_seed(1000 * rank + 10 * step + micro)
    tokens = torch.randint(0, 64, (MICRO, SEQ), generator=g)
    is_patch = torch.zeros(MICRO, SEQ, dtype=torch.bool)
    if not text_only:
        is_patch[0, 3:7] = True
    image_ids = torch.full((MICRO, SEQ), -1, dtype=torch.int32)
    image_ids[is_patch] = 0
    labels = torch.roll(tokens, -1, 1)
    labels[:, -1] = -100
    labels[torch.roll(is_patch, -1, 1) | is_patch] = -100
    return PackedBatch(tokens=tokens, patches=torch.randn(int(is_patch.sum()), 3 * 2 * 2, generator=g), is_patch=is_patch,
                       doc_ids=torch.zeros(MICRO, SEQ, dtype=torch.int32), image_ids=image_ids,
                       position_ids=torch.arange(SEQ, dtype=torch.int32).expand(MICRO, SEQ).contiguous(),
                       labels=labels, source_ids=torch.zeros(MICRO, SEQ, dtype=torch.int8))


def build_engine(cfg, world: int, seed: int = 0):
    """What pretrain/train.py builds: expert groups, model, param groups, schedule, deepspeed.initialize."""
    import deepspeed
    from pretrain.ds_config import build_ds_config
    from pretrain.models import build_model
    from pretrain.optim import build_optimizer, param_groups
    from pretrain.schedule import lr_multiplier

    torch.manual_seed(seed)
    group = None
    if cfg.model.kind == "moe":
        from pretrain.models.moe_parallel import create_expert_parallel_group
        group = create_expert_parallel_group(cfg.model.moe.expert_parallel_size)
    model = build_model(cfg.model, expert_group=group)
    t = cfg.train
    groups = param_groups(model, t.lr, t.weight_decay)
    if group is not None:
        from pretrain.models.moe_parallel import moe_param_groups
        groups = moe_param_groups(groups)
    opt = build_optimizer(groups, (t.beta1, t.beta2), t.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_multiplier(s, t.max_steps, t.warmup_steps, t.cooldown_fraction))
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                      config=build_ds_config(cfg, world))
    return engine


def train_steps(engine, rank: int, steps, global_rows: bool = False) -> list[float]:
    """Optimizer steps on synthetic batches; returns the mean loss per step over all ranks.
    global_rows: micro-batch `micro` of `rank` is the global batch's number micro * world + rank,
    so a step sees the same data whatever the world size."""
    import torch.distributed as dist

    losses = []
    world = dist.get_world_size()
    for step in steps:
        total = torch.zeros((), dtype=torch.float64)
        for micro in range(engine.gradient_accumulation_steps()):
            batch = synthetic_batch(0, step, micro * world + rank) if global_rows else synthetic_batch(rank, step, micro)
            out = engine(batch)
            engine.backward(out.loss)
            engine.step()
            total += out.loss.detach().double()
        dist.all_reduce(total)
        losses.append(float(total) / (engine.gradient_accumulation_steps() * dist.get_world_size()))
    return losses


def init_worker(rank: int, world: int, port: int) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu"})
    torch.set_num_threads(1)
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)


def spawn(target, world: int, args: tuple = (), timeout: float = 300) -> None:
    """Run target(rank, world, port, *args) on `world` spawned processes; fail (never hang) when
    one does not finish within `timeout` s or exits non-zero."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, *args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    hung = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not hung, f"workers {hung} did not finish within {timeout} s"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


def full_weight(engine, p) -> torch.Tensor:
    """A parameter's full fp32 value as DeepSpeed gathers it (frozen ones: the module's copy)."""
    from deepspeed.utils import safe_get_full_fp32_param

    if p.requires_grad and engine.zero_optimization_stage():
        return safe_get_full_fp32_param(p)
    if hasattr(p, "ds_id"):  # ZeRO-3 shard of a frozen parameter
        import deepspeed
        with deepspeed.zero.GatheredParameters([p]):
            return p.detach().float().clone()
    return p.detach().float()


def full_reference(engine) -> dict:
    """DeepSpeed's own gather of every parameter's fp32 master weight and Adam moments, in the
    plain model's names with every expert (collective: every rank calls it)."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from pretrain.checkpoint.zero_files import is_expert, plain_name

    out: dict = {"weights": {}, "exp_avg": {}, "exp_avg_sq": {}}
    zero = engine.zero_optimization_stage()
    if zero in (1, 2):
        # DeepSpeed 0.19 links the moments of every group to its parameters after group 0's first
        # step, when later groups have no state yet; link again now that all have.
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    for name, p in engine.module.named_parameters():
        vals = {"weights": full_weight(engine, p),
                "exp_avg": safe_get_full_optimizer_state(p, "exp_avg") if zero else None,
                "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq") if zero else None}
        if not zero:
            st = engine.optimizer.state.get(p, {})
            vals["exp_avg"], vals["exp_avg_sq"] = st.get("exp_avg"), st.get("exp_avg_sq")
        for kind, v in vals.items():
            if v is None:
                continue
            v = v.detach().clone().float()
            if is_expert(name) and getattr(p, "group_name", None):
                from deepspeed.utils import groups
                g = groups._get_expert_parallel_group(p.group_name)
                parts = [torch.empty_like(v) for _ in range(dist.get_world_size(g))]
                dist.all_gather(parts, v, group=g)
                v = torch.cat(parts, dim=0)
            out[kind][plain_name(name)] = v
    return out
