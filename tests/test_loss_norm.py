"""Global loss normalisation (pretrain/loss_norm.py): one optimizer step over 4 micro-batches on 2
DeepSpeed ranks (2 ranks x 2 accumulation steps, ZeRO-2 and ZeRO-3, fp32) gives the gradients of one plain
autograd step over the same rows as a single batch on one process.

The micro-batches hold very different numbers of text targets (one has none), so a mean of
micro-batch means (what DeepSpeed's default averaging gives when each micro-batch reports its own
mean) is far from the reference; `test_micro_batch_means_differ` checks that the data tells the two
apart by much more than the tolerance. The MoE case (expert parallelism 2) checks that the same
scale is right for expert gradients, which DeepSpeed reduces in the expert-data-parallel group;
its auxiliary loss keeps its per-micro-batch normalisation (a mean over micro-batches).

One pair of spawned gloo workers runs both scenarios (engine start-up is the slow part).
Run:  python -m pytest tests/test_loss_norm.py -q
"""
from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import spawn_workers

WORLD, GAS, MICRO, SEQ = 2, 2, 2, 24
PATCH_DIM = 3 * 2 * 2
# Targets per micro-batch (rank, micro): deliberately unequal, one micro-batch without any.
KEEP = {(0, 0): 40, (0, 1): 3, (1, 0): 0, (1, 1): 25}
# (name, model kind, ZeRO stage): ZeRO-3 partitions the parameters too; the MoE runs at expert
# parallelism 2 (expert gradients reduced over the expert-data-parallel group).
SCENARIOS = [("early_z2", "early", 2), ("early_z3", "early", 3), ("moe_z2", "moe", 2)]


def _cfg(kind: str, zero: int = 2):
    from pretrain.config import RunConfig
    from pretrain.models.config import ModelConfig, MoEConfig

    cfg = RunConfig()
    cfg.model = ModelConfig(kind=kind, vocab_size=64, width=32, depth=2, head_dim=16, patch_size=2,
                            image_size=4, attention_backend="reference",
                            moe=MoEConfig(num_experts=4, top_k=1, aux_loss_weight=0.01, z_loss_weight=1e-3,
                                          expert_parallel_size=2 if kind == "moe" else 1))
    cfg.data.patch_size, cfg.data.image_size = 2, 4
    t = cfg.train
    t.zero_stage, t.micro_batch_size, t.global_batch_size = zero, MICRO, MICRO * GAS * WORLD
    t.grad_clip, t.precision, t.lr, t.weight_decay = 1e9, "fp32", 1e-3, 0.0
    cfg.validate(WORLD)
    return cfg


def _batch(rank: int, micro: int):
    """Rows of random text with one 4-patch image in row 0; all but KEEP[rank, micro] of the
    text targets are masked."""
    from pretrain.batch import PackedBatch

    g = torch.Generator().manual_seed(100 * rank + micro)
    tokens = torch.randint(0, 64, (MICRO, SEQ), generator=g)
    is_patch = torch.zeros(MICRO, SEQ, dtype=torch.bool)
    is_patch[0, 5:9] = True
    image_ids = torch.full((MICRO, SEQ), -1, dtype=torch.int32)
    image_ids[is_patch] = 0
    labels = torch.roll(tokens, -1, 1)
    labels[:, -1] = -100
    labels[torch.roll(is_patch, -1, 1) | is_patch] = -100
    valid = (labels != -100).flatten().nonzero().flatten()
    drop = valid[torch.randperm(valid.numel(), generator=g)[KEEP[rank, micro]:]]
    labels.view(-1)[drop] = -100
    assert int((labels != -100).sum()) == KEEP[rank, micro]
    return PackedBatch(tokens=tokens, patches=torch.randn(4, PATCH_DIM, generator=g), is_patch=is_patch,
                       doc_ids=torch.zeros(MICRO, SEQ, dtype=torch.int32), image_ids=image_ids,
                       position_ids=torch.arange(SEQ, dtype=torch.int32).expand(MICRO, SEQ).contiguous(),
                       labels=labels, source_ids=torch.zeros(MICRO, SEQ, dtype=torch.int8))


def _engine(cfg):
    """What pretrain/train.py builds: groups, model, optimizer, deepspeed.initialize."""
    import deepspeed
    from pretrain.ds_config import build_ds_config
    from pretrain.models import build_model
    from pretrain.optim import build_optimizer, param_groups

    group = None
    torch.manual_seed(0)
    groups_fn = None
    if cfg.model.kind == "moe":
        from pretrain.models.moe_parallel import create_expert_parallel_group, moe_param_groups
        group, groups_fn = create_expert_parallel_group(cfg.model.moe.expert_parallel_size), moe_param_groups
    model = build_model(cfg.model, expert_group=group)
    t = cfg.train
    groups = param_groups(model, t.lr, t.weight_decay)
    opt = build_optimizer(groups_fn(groups) if groups_fn else groups, (t.beta1, t.beta2), t.eps)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=build_ds_config(cfg, WORLD))
    return engine


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu"})
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.utils import safe_get_full_grad
    from pretrain.loss_norm import LossMeter, forward_backward

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    res = {}
    for name, kind, zero in SCENARIOS:
        engine = _engine(_cfg(kind, zero))
        meter = LossMeter(torch.device("cpu"))
        meter.add(forward_backward(engine, [_batch(rank, m) for m in range(GAS)], torch.device("cpu")))
        grads = {n: safe_get_full_grad(p).detach().clone() for n, p in engine.module.named_parameters()
                 if not is_moe_param(p)}  # every rank's experts differ under EP=2: the norm covers them
        engine.step()
        loss, aux = meter.reduce()
        res[name] = {"grads": grads, "loss": loss, "aux": aux, "norm": float(engine.get_global_grad_norm())}
        del engine
    if rank == 0:
        torch.save(res, os.path.join(out_dir, "rank0.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results():
    out_dir = spawn_workers(_worker, WORLD)
    return torch.load(os.path.join(out_dir, "rank0.pt"), weights_only=True)


def _reference(kind: str, micro_means: bool = False):
    """One process, plain autograd, float64: the step's rows as one batch (CE = sum / all
    targets); the MoE auxiliary loss as the mean of its per-micro-batch values. With
    `micro_means`, the old objective instead: the mean of the micro-batches' mean losses."""
    from pretrain.batch import collate
    from pretrain.models import build_model

    cfg = _cfg(kind)
    cfg.model.moe.expert_parallel_size = 1
    torch.manual_seed(0)
    model = build_model(cfg.model).double()
    micro = [_batch(r, m) for r in range(WORLD) for m in range(GAS)]
    for b in micro:
        b.patches = b.patches.double()
    if micro_means:
        loss = torch.stack([model(b).loss for b in micro]).mean()
    else:
        whole = model(collate(micro))
        loss = whole.ce_loss
        if kind == "moe":
            loss = loss + torch.stack([model(b).aux_loss for b in micro]).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    norm = float(torch.sqrt(sum(g.pow(2).sum() for g in grads.values())))
    with torch.no_grad():
        ce = float(model(collate(micro)).ce_loss)
    return grads, norm, ce


@pytest.mark.parametrize("name,kind,zero", SCENARIOS)
def test_two_ranks_four_micro_batches_equal_one_batch(results, name, kind, zero):
    got = results[name]
    ref_grads, ref_norm, ref_ce = _reference(kind)
    assert got["grads"], "no gradients recorded"
    for name, g in got["grads"].items():
        ref = ref_grads[name]
        torch.testing.assert_close(g.double(), ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()) + 1e-9,
                                   msg=lambda m: f"{kind} {name}: {m}")
    assert got["norm"] == pytest.approx(ref_norm, rel=1e-4)
    assert got["loss"] == pytest.approx(ref_ce, rel=1e-5)  # the logged loss is the global mean
    if kind == "moe":
        assert got["aux"] > 0


def test_micro_batch_means_differ():
    """The test data separates the two objectives: the old mean of micro-batch means moves the
    gradient by far more than the tolerance above."""
    ref, _, _ = _reference("early")
    old, _, _ = _reference("early", micro_means=True)
    rel = max(float((old[n] - ref[n]).norm() / ref[n].norm().clamp(min=1e-30)) for n in ref)
    assert rel > 0.05
