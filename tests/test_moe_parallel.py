"""Expert parallelism on DeepSpeed, two gloo ranks on CPU (pretrain/models/moe_parallel.py).

One pair of spawned worker processes runs every scenario (engine start-up is the slow part), then
the tests compare what they recorded:
  - EP=2 gives the same losses and the same (clipped) global gradient norm as EP=1 on the same
    global batches, under ZeRO-1 and ZeRO-2 (clipping active: grad_clip below the norm);
  - no hang when every token goes to one expert (the other rank's experts get zero rows) and one
    rank's micro-batches hold no image tokens, in training and in no-grad evaluation;
  - save -> reload at the same EP size -> continue gives identical losses;
  - activation checkpointing (the exchange re-run inside backward) changes nothing.
Run:  python -m pytest tests/test_moe_parallel.py -q       (about a minute on 2 cores)
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.engines import synthetic_batch as _batch  # the same deterministic micro-batches
from tests.helpers import spawn_workers

WORLD = 2
STEPS = 3
GAS = 2
MICRO = 2
SEQ = 16


def _run_cfg(zero: int, ep: int, clip: float = 0.05):
    from pretrain.config import RunConfig
    from pretrain.models.config import ModelConfig, MoEConfig

    cfg = RunConfig()
    cfg.model = ModelConfig(kind="moe", vocab_size=64, width=32, depth=2, head_dim=16, patch_size=2,
                            attention_backend="reference",
                            moe=MoEConfig(num_experts=4, top_k=1, aux_loss_weight=0.01, z_loss_weight=1e-3,
                                          expert_parallel_size=ep))
    cfg.data.patch_size, cfg.data.image_size = cfg.model.patch_size, 4  # 2x2 patches, as _batch builds
    t = cfg.train
    t.zero_stage, t.micro_batch_size, t.global_batch_size = zero, MICRO, MICRO * GAS * WORLD
    t.grad_clip, t.precision, t.lr, t.weight_decay = clip, "fp32", 1e-2, 1e-4
    cfg.validate(WORLD)
    return cfg


def _engine(cfg, seed: int = 0):
    """What pretrain/train.py does: groups, model, MoE param groups, deepspeed.initialize."""
    import deepspeed
    from pretrain.ds_config import build_ds_config
    from pretrain.models import build_model
    from pretrain.models.moe_parallel import create_expert_parallel_group, moe_param_groups
    from pretrain.optim import build_optimizer, param_groups

    torch.manual_seed(seed)
    group = create_expert_parallel_group(cfg.model.moe.expert_parallel_size)
    model = build_model(cfg.model, expert_group=group)
    t = cfg.train
    opt = build_optimizer(moe_param_groups(param_groups(model, t.lr, t.weight_decay)), (t.beta1, t.beta2), t.eps)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=build_ds_config(cfg, WORLD))
    assert engine.has_moe_layers  # DeepSpeed recognised our layers
    return engine


def _train_steps(engine, rank, steps, text_only_rank=None):
    import torch.distributed as dist

    losses, norms = [], []
    for step in steps:
        step_loss = torch.zeros((), dtype=torch.float64)
        for micro in range(GAS):
            out = engine(_batch(rank, step, micro, text_only=rank == text_only_rank))
            engine.backward(out.loss)
            engine.step()
            step_loss += out.loss.detach().double()
        dist.all_reduce(step_loss)
        losses.append(float(step_loss) / (GAS * WORLD))
        norms.append(float(engine.get_global_grad_norm()))
    return losses, norms


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu"})
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist
    from pretrain import checkpoint
    import pretrain.models.moe as moe_mod

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    res: dict = {}

    # 1. EP=1 vs EP=2 under ZeRO-1 and ZeRO-2, same global batches; rank 1's micro-batches hold
    #    no image tokens (the text-only case runs through every scenario).
    for zero in (1, 2):
        for ep in (1, 2):
            engine = _engine(_run_cfg(zero, ep))
            res[f"z{zero}_ep{ep}"] = _train_steps(engine, rank, range(STEPS), text_only_rank=1)
            del engine

    # Activation checkpointing: the recomputation re-runs the exchange inside the backward pass.
    cfg = _run_cfg(2, 2)
    cfg.model.activation_checkpointing = True
    engine = _engine(cfg)
    res["z2_ep2_ckpt_act"] = _train_steps(engine, rank, range(STEPS), text_only_rank=1)
    del engine

    # 2. Every token to expert 0 (rank 0's): rank 1's experts receive zero rows from everyone.
    real_route = moe_mod.route

    def all_to_expert_0(x_TD, w, k):
        logits_TE, probs_TE, _, _ = real_route(x_TD, w, k)
        ids_TK = torch.zeros(x_TD.shape[0], k, dtype=torch.long, device=x_TD.device)
        return logits_TE, probs_TE, probs_TE.gather(1, ids_TK), ids_TK

    moe_mod.route = all_to_expert_0
    try:
        engine = _engine(_run_cfg(2, 2))
        losses, norms = _train_steps(engine, rank, range(2), text_only_rank=1)
        counts = [m.last_counts_E2.tolist() for m in moe_mod.moe_layers(engine.module)]
        engine.eval()
        with torch.no_grad():
            eval_loss = float(engine(_batch(rank, 99, 0, text_only=rank == 1)).loss)
        engine.train()
        res["skewed"] = {"losses": losses, "norms": norms, "counts": counts, "eval_loss": eval_loss}
        del engine
    finally:
        moe_mod.route = real_route

    # 3. Checkpoint: 4 steps with a save after step 2; a fresh engine (other init seed) loads it
    #    at the same EP size and repeats steps 3-4.
    ckpt_root = os.path.join(out_dir, "ckpt")
    for zero in (1, 2):
        root = f"{ckpt_root}_z{zero}"
        engine = _engine(_run_cfg(zero, 2))
        first, _ = _train_steps(engine, rank, range(2))
        path = checkpoint.save(engine, Path(root), 2, {}, keep=2)
        engine.eval()
        with torch.no_grad():  # this rank's loss at the saved weights, for the consolidation test
            saved_loss = float(engine(_batch(rank, 50, 0)).loss)
        engine.train()
        cont, cont_norms = _train_steps(engine, rank, range(2, 4))
        del engine
        engine = _engine(_run_cfg(zero, 2), seed=123)
        checkpoint.load(engine, path)
        resumed, resumed_norms = _train_steps(engine, rank, range(2, 4))
        res[f"ckpt_z{zero}"] = {"continued": cont, "resumed": resumed,
                                "continued_norms": cont_norms, "resumed_norms": resumed_norms,
                                "files": sorted(os.listdir(path)), "path": str(path),
                                "saved_loss": saved_loss}
        del engine

    res[f"rank{rank}_done"] = True
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results():
    out_dir = spawn_workers(_worker, WORLD)
    with open(os.path.join(out_dir, "rank0.json")) as f:
        r0 = json.load(f)
    with open(os.path.join(out_dir, "rank1.json")) as f:
        r1 = json.load(f)
    return r0, r1


@pytest.mark.parametrize("zero", [1, 2])
def test_ep2_matches_ep1(results, zero):
    r0, r1 = results
    loss1, norm1 = r0[f"z{zero}_ep1"]
    loss2, norm2 = r0[f"z{zero}_ep2"]
    assert loss1 == pytest.approx(loss2, rel=1e-5, abs=1e-6)
    assert norm1 == pytest.approx(norm2, rel=1e-5)
    assert min(norm1) > 0.05  # clipping (grad_clip 0.05) was active, so the norm matters
    assert len(set(round(v, 6) for v in loss1)) == STEPS  # the model moved
    assert r1[f"z{zero}_ep2"] == r0[f"z{zero}_ep2"]  # both ranks agree on loss and norm


def test_grad_norm_matches_single_process(results):
    """Absolute check of the clipped norm (catches an expert counted once per replica in both
    EP settings alike): plain autograd on one process over the whole first global batch."""
    from pretrain.models import build_model

    r0, _ = results
    cfg = _run_cfg(1, 1)
    torch.manual_seed(0)
    model = build_model(cfg.model)  # no expert group: the plain MoEFFN, same initial weights
    losses = [model(_batch(r, 0, m, text_only=r == 1)).loss for r in range(WORLD) for m in range(GAS)]
    loss = torch.stack(losses).mean()
    loss.backward()
    norm = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters() if p.grad is not None))
    assert float(loss.detach()) == pytest.approx(r0["z1_ep1"][0][0], rel=1e-6)
    assert float(norm) == pytest.approx(r0["z1_ep2"][1][0], rel=1e-5)
    assert float(norm) == pytest.approx(r0["z2_ep2"][1][0], rel=1e-5)


def test_zero1_equals_zero2(results):
    r0, _ = results
    assert r0["z1_ep2"][0] == pytest.approx(r0["z2_ep2"][0], rel=1e-5)


def test_activation_checkpointing_with_expert_parallelism(results):
    r0, _ = results
    loss, norm = r0["z2_ep2_ckpt_act"]
    assert loss == pytest.approx(r0["z2_ep2"][0], rel=1e-6)
    assert norm == pytest.approx(r0["z2_ep2"][1], rel=1e-5)


def test_no_hang_all_tokens_to_one_expert_text_only_rank(results):
    r0, r1 = results
    for r in (r0, r1):
        s = r["skewed"]
        assert all(torch.isfinite(torch.tensor(s["losses"] + s["norms"] + [s["eval_loss"]])))
        for layer_counts in s["counts"]:  # [E, 2] text / image: everything on expert 0
            assert all(sum(c) == 0 for c in layer_counts[1:])
    assert all(c[1] == 0 for layer in r1["skewed"]["counts"] for c in layer)  # rank 1: no images


@pytest.mark.parametrize("zero", [1, 2])
def test_checkpoint_resume_identical(results, zero):
    r0, r1 = results
    c = r0[f"ckpt_z{zero}"]
    assert c["resumed"] == c["continued"]
    assert c["resumed_norms"] == c["continued_norms"]
    # DeepSpeed wrote one expert file per MoE layer and expert-parallel rank.
    expert_files = [f for f in c["files"] if f.startswith("layer_")]
    assert len(expert_files) == 2 * WORLD, c["files"]


def test_zero3_refused():
    from pretrain.config import ConfigError

    with pytest.raises(ConfigError, match="zero_stage=1 or 2"):
        _run_cfg(3, 1)
    with pytest.raises(ConfigError, match="zero_stage=1 or 2"):
        _run_cfg(0, 2)


def test_consolidated_state_dict_loads_into_plain_model(results):
    """The EP=2 checkpoint, merged by moe_parallel.consolidated_state_dict, loads (strict) into
    the plain single-process model and gives the same losses as the engine that saved it."""
    from pretrain.models import build_model
    from pretrain.models.moe_parallel import consolidated_state_dict

    cfg = _run_cfg(2, 1)
    model = build_model(cfg.model)
    model.load_state_dict(consolidated_state_dict(results[0]["ckpt_z2"]["path"]), strict=True)
    model.eval()
    with torch.no_grad():
        for rank, r in enumerate(results):
            assert float(model(_batch(rank, 50, 0)).loss) == pytest.approx(r["ckpt_z2"]["saved_loss"], rel=1e-6)
