"""Elastic resume (pretrain/checkpoint/elastic.py): a checkpoint saved on 2 gloo ranks continues on
1 rank and back on 2, for dense ZeRO-2, ZeRO-3, ZeRO-0, late fusion with a frozen encoder (ZeRO-3)
and the MoE at expert-parallel size 2 -> 1.

References are DeepSpeed's own gathers of the live engines (tests/engines.full_reference):
  - after resharding, the fp32 master weights and both Adam moments equal, element for element,
    those of the engine that saved the checkpoint; the step counters and learning rate agree;
  - the loss continues: every step sees the same global batch whatever the world size, so the
    resharded run's losses match the uninterrupted 2-rank run's to rel 1e-5. Not bitwise: with
    one rank the gradient of a step is summed over 4 accumulated micro-batches, with two ranks
    over 2 micro-batches and then across ranks, and fp32 addition is not associative.
Also `train.init_from` (pretrain/checkpoint/start.py): the saved weights into another ZeRO stage on
1 rank, exactly, with a fresh optimizer and step 0.
And `load_consolidated` (pretrain/checkpoint/consolidated.py) on every saved layout, late fusion
included: the full fp32 state equals DeepSpeed's gather, loads strictly into the plain model built
from the saved config, and a config of another shape is refused naming the differing keys.
Run:  python -m pytest tests/test_elastic_resume.py -q
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.engines import build_engine, full_reference, init_worker, spawn, tiny_run_config, train_steps

# name -> (kind, zero stage, ep on 2 ranks, ep on 1 rank)
LAYOUTS = {"dense_z2": ("early", 2, 1, 1), "dense_z3": ("early", 3, 1, 1), "moe_z2": ("moe", 2, 2, 1),
           "dense_z0": ("early", 0, 1, 1), "late_frozen_z3": ("late", 3, 1, 1)}
SAVE_AT, STEPS = 2, 4


SAVE_ONLY = {"late_z1": ("late", 1, 1, 1)}  # saved for the load_consolidated checks only
INIT_STAGE = {"dense_z2": 3, "dense_z3": 1, "moe_z2": 1, "dense_z0": 2, "late_frozen_z3": 2}


def _cfg(name: str, kind: str, zero: int, ep: int, world: int, gas: int = 2):
    cfg = tiny_run_config(kind, zero, ep, world=world, gas=gas)
    if "frozen" in name:  # the vision encoder frozen (lr_mult 0): parameters without optimizer state
        cfg.model.vision.lr_mult = 0.0
    return cfg


def _save_weights(rank, out: Path, name: str, engine) -> None:
    from pretrain.checkpoint.zero_files import plain_name
    from tests.engines import full_weight

    weights = {plain_name(n): full_weight(engine, p).clone() for n, p in engine.module.named_parameters()}
    fresh = all(not st for st in engine.optimizer.optimizer.state.values())
    if rank == 0:
        torch.save({"weights": weights, "optimizer_fresh": fresh, "global_steps": engine.global_steps},
                   out / f"{name}.pt")


def _counters(engine) -> dict:
    return {"global_steps": engine.global_steps, "global_samples": engine.global_samples,
            "lr": [g["lr"] for g in engine.optimizer.param_groups]}


def _save_ref(rank, out: Path, name: str, engine, extra: dict) -> None:
    ref = full_reference(engine)
    if rank == 0:
        torch.save({**ref, **_counters(engine), **extra}, out / f"{name}.pt")


def _phase(rank: int, world: int, port: int, out_dir: str, phase: str) -> None:
    init_worker(rank, world, port)
    from pretrain import checkpoint

    out = Path(out_dir)
    for name, (kind, zero, ep2, ep1) in {**LAYOUTS, **(SAVE_ONLY if phase == "two_first" else {})}.items():
        engine = None
        if phase == "two_first":  # uninterrupted 2-rank run, saving at SAVE_AT
            cfg = _cfg(name, kind, zero, ep2, world=2)
            engine = build_engine(cfg, 2)
            losses = train_steps(engine, rank, range(SAVE_AT), global_rows=True)
            checkpoint.save(engine, out / name / "a", SAVE_AT, {}, keep=1, config=cfg)
            _save_ref(rank, out, f"{name}.a", engine, {})
            losses += train_steps(engine, rank, range(SAVE_AT, STEPS), global_rows=True)
            if rank == 0:
                torch.save(losses, out / f"{name}.uninterrupted.pt")
        elif phase == "one":  # resume that checkpoint on 1 rank, continue, save again at STEPS
            cfg = _cfg(name, kind, zero, ep1, world=1, gas=4)  # the same global batch
            engine = build_engine(cfg, 1, seed=123)  # other initial weights: everything must be loaded
            client = checkpoint.load(engine, out / name / "a" / f"step_{SAVE_AT:08d}")
            assert client["resharded"]["from"]["world_size"] == 2
            _save_ref(rank, out, f"{name}.one_loaded", engine, {})
            losses = train_steps(engine, rank, range(SAVE_AT, STEPS), global_rows=True)
            checkpoint.save(engine, out / name / "b", STEPS, {}, keep=1, config=cfg)
            _save_ref(rank, out, f"{name}.b", engine, {"losses": losses})
            del engine
            # train.init_from: the weights only, into another ZeRO stage; the optimizer stays fresh
            cfg = _cfg(name, kind, INIT_STAGE[name], ep1, world=1, gas=4)
            cfg.train.init_from = str(out / name / "a")
            engine = build_engine(cfg, 1, seed=5)
            checkpoint.start(engine, None, cfg, out / name / "fresh_run", log=lambda m: None)
            _save_weights(rank, out, f"{name}.init_from", engine)
        elif phase == "two_again" and name == "dense_z2":  # and back on 2 ranks
            cfg = _cfg(name, kind, zero, ep2, world=2)
            engine = build_engine(cfg, 2, seed=7)
            checkpoint.load(engine, out / name / "b" / f"step_{STEPS:08d}")
            _save_ref(rank, out, f"{name}.two_loaded", engine, {})
        del engine


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("elastic")
    spawn(_phase, 2, (str(out), "two_first"), timeout=400)
    spawn(_phase, 1, (str(out), "one"), timeout=400)
    spawn(_phase, 2, (str(out), "two_again"), timeout=300)
    return out


def _load(runs, name):
    return torch.load(runs / f"{name}.pt", weights_only=True)


def _assert_same_state(a: dict, b: dict) -> None:
    for kind in ("weights", "exp_avg", "exp_avg_sq"):
        assert set(a[kind]) == set(b[kind]), kind
        assert a[kind], kind
        for k in a[kind]:
            assert torch.equal(a[kind][k], b[kind][k]), (kind, k)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_two_to_one_rank_state_is_exact(runs, name):
    saved, loaded = _load(runs, f"{name}.a"), _load(runs, f"{name}.one_loaded")
    if "frozen" in name:  # the encoder really has no optimizer state
        frozen = set(saved["weights"]) - set(saved["exp_avg"])
        assert frozen and all(k.startswith("image_embedder.") for k in frozen)
    _assert_same_state(saved, loaded)
    assert loaded["global_steps"] == saved["global_steps"] == SAVE_AT
    assert loaded["global_samples"] == saved["global_samples"]
    assert loaded["lr"] == saved["lr"]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_loss_continues_after_resharding(runs, name):
    uninterrupted = torch.load(runs / f"{name}.uninterrupted.pt", weights_only=True)
    resumed = _load(runs, f"{name}.b")["losses"]
    assert resumed == pytest.approx(uninterrupted[SAVE_AT:], rel=1e-5)
    assert len(set(round(v, 5) for v in uninterrupted)) == STEPS  # the model did move


def test_one_to_two_ranks_state_is_exact(runs):
    saved, loaded = _load(runs, "dense_z2.b"), _load(runs, "dense_z2.two_loaded")
    _assert_same_state(saved, loaded)
    assert loaded["global_steps"] == STEPS and loaded["lr"] == saved["lr"]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_init_from_takes_weights_only(runs, name):
    saved, init = _load(runs, f"{name}.a"), _load(runs, f"{name}.init_from")
    assert set(init["weights"]) == set(saved["weights"])
    for k, v in saved["weights"].items():
        assert torch.equal(init["weights"][k], v), k
    assert init["optimizer_fresh"] and init["global_steps"] == 0


@pytest.mark.parametrize("name", [*LAYOUTS, *SAVE_ONLY])
def test_consolidated_equals_engine_gather(runs, name):
    from pretrain.checkpoint import load_consolidated
    from pretrain.models import build_model

    ref = _load(runs, f"{name}.a")["weights"]
    step_dir = runs / name / "a" / f"step_{SAVE_AT:08d}"
    for path in (runs / name / "a", step_dir):  # run dir (here: its checkpoints folder) or step dir
        ck = load_consolidated(path)
        assert ck.step == SAVE_AT and ck.path == step_dir
        assert set(ck.model_state) == set(ref)
        for k, v in ref.items():
            assert ck.model_state[k].dtype == torch.float32
            assert torch.equal(ck.model_state[k], v), k
    model = build_model(ck.config.model)
    assert sorted(model.state_dict()) == sorted(ck.model_state)
    model.load_state_dict(ck.model_state, strict=True)


def test_consolidated_shape_mismatch_names_the_keys(runs):
    from pretrain.checkpoint import CheckpointError, load_consolidated
    from pretrain.checkpoint.consolidated import load_run_config
    from pretrain.checkpoint.layout import resolve_step_dir

    cfg = load_run_config(resolve_step_dir(runs / "dense_z3" / "a"))
    cfg.model.vocab_size = 80  # embedding and output rows differ, nothing else
    with pytest.raises(CheckpointError) as err:
        load_consolidated(runs / "dense_z3" / "a", config=cfg)
    msg = str(err.value)
    assert "embed.weight: checkpoint (64, 32) vs config (80, 32)" in msg
    assert "2 keys differ" in msg  # embed.weight and the output head, nothing else


def test_consolidated_refuses_incomplete_checkpoint(runs, tmp_path):
    import shutil
    from pretrain.checkpoint import CheckpointError, load_consolidated

    step = tmp_path / "checkpoints" / "step_00000002"
    shutil.copytree(runs / "moe_z2" / "a" / "step_00000002", step)
    (step / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_consolidated(tmp_path)
    with pytest.raises(CheckpointError, match="interrupted"):
        load_consolidated(step)
