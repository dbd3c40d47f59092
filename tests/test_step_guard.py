"""Non-finite steps: skipped in ZeRO-0 and ZeRO-2, counted, logged as strict JSON; a streak of them
stops the run (named first bad step, exit non-zero, `finished: false`); checkpoints stay finite.

Two 2-rank runs share the assertions: ZeRO-0 started as two SLURM tasks (the variables srun sets),
ZeRO-2 through launch.sh and then resumed. NaN is planted in the last rank's loss at step 2 (one
skip, the run goes on) and from step 4 on (train.max_skipped_steps=2 -> stop at step 5)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from pretrain.metrics import MetricsLogger
from pretrain.step_guard import TEST_NAN_ENV, parse_planted_steps, state_is_finite
from tests.helpers import REPO, TINY_OVERRIDES, _free_port, run_launch

DEMO = str(REPO / "pretrain/configs/demo.yaml")
PLANT = "2,4+"
MAX_STEPS = 8


def _overrides(run_dir, data_root, stage):
    return [*TINY_OVERRIDES, f"run.dir={run_dir}", f"data.root={data_root}", f"train.max_steps={MAX_STEPS}",
            "train.eval_every=100", "train.save_every=1", "train.keep_checkpoints=3",
            f"train.zero_stage={stage}", "train.max_skipped_steps=2", "train.precision=fp32"]


def _strict_records(run_dir):
    def refuse(token):
        raise AssertionError(f"metrics.jsonl holds {token}, which is not JSON")
    return [json.loads(ln, parse_constant=refuse) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _tensors(obj, prefix=""):
    """name -> tensor for every tensor nested in a loaded checkpoint file."""
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}/{i}")


def _engine_state(ckpt):
    """Every tensor DeepSpeed saved (weights, fp32 master partitions, Adam moments and step)."""
    out = {}
    for f in sorted(ckpt.glob("*.pt")):
        if not f.name.startswith("rank_"):  # our own file: loader position and RNG, which move on
            out.update({f.name + k: t for k, t in _tensors(torch.load(f, weights_only=False))})
    return out


def _check_stopped_run(run_dir, outputs):
    train = [r for r in _strict_records(run_dir) if r["type"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5]  # stopped at the 2nd skip in a row
    assert [r["skipped_steps"] for r in train] == [0, 1, 0, 1, 1]
    assert train[-1]["skipped_steps_total"] == 3
    for r in train:
        if r["skipped_steps"]:
            assert r["grad_norm"] is None and "grad_norm" in r["nonfinite"]
        else:
            assert r["grad_norm"] > 0
        assert r["step_time_s/min"] <= r["step_time_s/max"] and r["data_wait_s/min"] <= r["data_wait_s/max"]
        assert r["mem/rss_gb"] > 0 and r["mem/peak_rss_gb"] >= r["mem/rss_gb"] * 0.5
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] is False and summary["skipped_steps"] == 3
    assert summary["stopped"]["reason"] == "nonfinite_steps" and summary["stopped"]["first_bad_step"] == 4
    assert "first at step 4" in outputs
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    assert [c.name for c in ckpts] == ["step_00000002", "step_00000003", "step_00000004"]
    states = {c.name: _engine_state(c) for c in ckpts}
    for name, state in states.items():
        bad = [k for k, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        assert not bad, (name, bad[:5])
    s3, s4 = states["step_00000003"], states["step_00000004"]
    assert s3.keys() == s4.keys() and all(torch.equal(s3[k], s4[k]) for k in s3)  # step 4 not applied
    s2 = states["step_00000002"]
    assert any(not torch.equal(s2[k], s3[k]) for k in s2)  # step 3 was


def test_nan_steps_zero0_two_slurm_tasks(tmp_path, tiny_demo):
    run_dir = tmp_path / "z0"
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = {**os.environ, TEST_NAN_ENV: PLANT, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(REPO), "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
               "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "localhost",
               "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_NODEID": "0", "MASTER_PORT": port}
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
            env.pop(k, None)
        procs.append(subprocess.Popen([sys.executable, "-u", "pretrain/train.py", "--config", DEMO,
                                       *_overrides(run_dir, tiny_demo, 0)], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [3, 3], outs[0][-3000:]
    assert "world 2" in outs[0]
    _check_stopped_run(run_dir, outs[0])


def test_nan_steps_zero2_launch_then_resume(tmp_path, tiny_demo):
    run_dir = tmp_path / "z2"
    r = run_launch(DEMO, _overrides(run_dir, tiny_demo, 2), timeout=300, env_extra={TEST_NAN_ENV: PLANT})
    assert r.returncode != 0, r.stdout[-3000:]
    _check_stopped_run(run_dir, r.stdout + r.stderr)
    # An auto-restart without the fault resumes from the last good checkpoint (step 4), drops the
    # metrics logged after it, and finishes.
    # (Launcher arguments after `--` reach deepspeed unchanged and replace launch.sh's own.)
    port = str(_free_port())
    r = run_launch(DEMO, [*_overrides(run_dir, tiny_demo, 2), "--", "--master_port", port], timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    echoed = next(ln for ln in r.stdout.splitlines() if ln.startswith("+ ") and "deepspeed" in ln).split()
    assert echoed.count("--master_port") == 1 and echoed[echoed.index("--master_port") + 1] == port
    assert "resumed from" in r.stdout and "step_00000004" in r.stdout
    train = [x for x in _strict_records(run_dir) if x["type"] == "train"]
    assert [x["step"] for x in train] == list(range(1, MAX_STEPS + 1))  # each step once
    assert [x["skipped_steps"] for x in train[4:]] == [0] * (MAX_STEPS - 4)  # resumed after step 4
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] is True and summary["step"] == MAX_STEPS and "stopped" not in summary
    assert summary["skipped_steps"] == 2  # steps 2 and 4, up to the checkpoint resumed from


def test_planted_step_spec():
    assert parse_planted_steps("2,5+") == (frozenset({2}), 5)
    assert parse_planted_steps("3") == (frozenset({3}), None)
    with pytest.raises(ValueError, match=TEST_NAN_ENV):
        parse_planted_steps("x")


def test_metrics_lines_are_strict_json_and_truncate_on_resume(tmp_path):
    log = MetricsLogger(tmp_path, {}, enabled=True, max_steps=10, wandb_cfg={})
    for step, loss in [(1, 2.0), (2, float("nan")), (3, float("inf")), (4, 1.5)]:
        log.log({"type": "train", "step": step, "loss": loss, "grad_norm": 1.0})
    log.log({"type": "eval", "step": 4, "loss/avg": 1.0})
    recs = _strict_records(tmp_path)
    assert [r["loss"] for r in recs[:4]] == [2.0, None, None, 1.5]
    assert recs[1]["nonfinite"] == ["loss"] and "nonfinite" not in recs[0]
    with open(log.path, "a") as f:
        f.write('{"type": "train", "step": 5, "lo')  # a line cut by a crash
    assert log.truncate_after(3) == 3  # step 4's two records and the cut line
    assert [r["step"] for r in _strict_records(tmp_path)] == [1, 2, 3]
    assert log.truncate_after(3) == 0
    assert log.truncate_after(3, also_at_step=("eval",)) == 0  # no eval record at step 3
    log.log({"type": "eval", "step": 3, "loss/avg": 1.0})
    assert log.truncate_after(3, also_at_step=("eval",)) == 1
    assert [r["type"] for r in _strict_records(tmp_path)] == ["train"] * 3


class _Engine:
    def __init__(self, module, optimizer):
        self.module, self.optimizer = module, optimizer


def test_state_is_finite_sees_weights_and_optimizer_state():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    engine = _Engine(model, type("Wrapper", (), {"optimizer": opt})())  # like DeepSpeed's wrappers
    assert state_is_finite(engine, torch.device("cpu"))
    opt.state[model.bias]["exp_avg_sq"][1] = float("inf")
    assert not state_is_finite(engine, torch.device("cpu"))
    opt.state[model.bias]["exp_avg_sq"][1] = 0.0
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    assert not state_is_finite(engine, torch.device("cpu"))


_ENGINE_SCRIPT = r"""
import os, sys, torch, deepspeed
from pretrain.step_guard import state_is_finite, _inner_optimizer
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
cpu = torch.device("cpu")
for stage in (0, 2):
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config={
        "train_batch_size": 2, "gradient_clipping": 1.0, "zero_optimization": {"stage": stage}})
    engine.backward(engine(torch.randn(2, 5)).sum())
    engine.step()
    inner = _inner_optimizer(engine.optimizer)
    master = inner.param_groups[0]["params"][0]
    moment = inner.state[master]["exp_avg_sq"]
    results = [state_is_finite(engine, cpu)]
    for t in (master.data, moment):  # the fp32 master weights, an Adam moment
        t.view(-1)[-1] = float("nan")
        results.append(state_is_finite(engine, cpu))
        t.view(-1)[-1] = 0.0
    print("stage", stage, results, flush=True)
"""


def test_state_is_finite_on_deepspeed_engines(tmp_path):
    """The same check finds DeepSpeed's own master weights and moments (ZeRO-0 and ZeRO-2)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", _ENGINE_SCRIPT, str(_free_port())], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("stage")]
    assert lines == ["stage 0 [True, False, False]", "stage 2 [True, False, False]"], r.stdout[-2000:]
