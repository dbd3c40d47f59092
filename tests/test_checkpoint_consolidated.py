"""load_consolidated (pretrain/checkpoint/consolidated.py): the full fp32 model state of a
checkpoint of any ZeRO stage / expert-parallel size equals DeepSpeed's own gather of the live
engine (safe_get_full_fp32_param, experts all-gathered over the expert-parallel group), and loads
strictly into the plain model built from the saved config.

One pair of spawned gloo ranks trains and saves every layout; the tests read the files afterwards.
Run:  python -m pytest tests/test_checkpoint_consolidated.py -q
"""
from __future__ import annotations

import pytest
import torch

from tests.engines import build_engine, init_worker, spawn, tiny_run_config, train_steps, full_reference

LAYOUTS = {"early_z0": ("early", 0, 1), "early_z3": ("early", 3, 1), "late_z1": ("late", 1, 1),
           "moe_z2_ep2": ("moe", 2, 2)}


def _worker(rank: int, world: int, port: int, out_dir: str, layouts: dict) -> None:
    init_worker(rank, world, port)
    from pathlib import Path
    from pretrain import checkpoint

    for name, (kind, zero, ep) in layouts.items():
        cfg = tiny_run_config(kind, zero, ep, world)
        engine = build_engine(cfg, world)
        train_steps(engine, rank, range(2))
        checkpoint.save(engine, Path(out_dir) / name / "checkpoints", 2, {}, keep=1, config=cfg)
        ref = full_reference(engine)
        if rank == 0:
            torch.save(ref, Path(out_dir) / f"{name}.ref.pt")
        del engine


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("consolidated")
    spawn(_worker, 2, (str(out), LAYOUTS), timeout=400)
    return out


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_consolidated_equals_engine_gather(saved, name):
    from pretrain.checkpoint import load_consolidated
    from pretrain.models import build_model

    ref = torch.load(saved / f"{name}.ref.pt", weights_only=True)["weights"]
    for path in (saved / name, saved / name / "checkpoints" / "step_00000002"):  # run dir or step dir
        ck = load_consolidated(path)
        assert ck.step == 2
        assert set(ck.model_state) == set(ref)
        for k, v in ref.items():
            assert ck.model_state[k].dtype == torch.float32
            assert torch.equal(ck.model_state[k], v), k
    model = build_model(ck.config.model)
    assert sorted(model.state_dict()) == sorted(ck.model_state)
    model.load_state_dict(ck.model_state, strict=True)


def test_shape_mismatch_names_the_keys(saved):
    from pretrain.checkpoint import CheckpointError, load_consolidated
    from pretrain.checkpoint.consolidated import load_run_config
    from pretrain.checkpoint.layout import resolve_step_dir

    cfg = load_run_config(resolve_step_dir(saved / "early_z3"))
    cfg.model.vocab_size = 80  # embedding and output rows differ, nothing else
    with pytest.raises(CheckpointError) as err:
        load_consolidated(saved / "early_z3", config=cfg)
    msg = str(err.value)
    assert "embed.weight: checkpoint (64, 32) vs config (80, 32)" in msg
    assert "2 keys differ" in msg  # embed.weight and the output head, nothing else


def test_incomplete_checkpoint_is_refused(saved, tmp_path):
    import shutil
    from pretrain.checkpoint import CheckpointError, load_consolidated

    step = tmp_path / "checkpoints" / "step_00000002"
    shutil.copytree(saved / "moe_z2_ep2" / "checkpoints" / "step_00000002", step)
    (step / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_consolidated(tmp_path)
    with pytest.raises(CheckpointError, match="interrupted"):
        load_consolidated(step)
