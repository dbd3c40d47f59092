"""Sweep generation, run collection and the fit tool, end to end on fake run directories.

    .venv/bin/python -m pytest tests/test_scaling_tools.py -q
"""
import csv
import importlib.util
import json
import os
import shlex

import numpy as np
import pytest
import yaml

from pretrain.scaling.law import ScalingLaw
from pretrain.scaling.presets import get_preset
from pretrain.scaling.runs import collect_runs, read_runs_csv
from pretrain.scaling.sweep import SweepConfig, parse_amount, plan_sweep, warmup_plan, warmup_steps, write_sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_warmup_rules_follow_the_paper():
    assert warmup_steps(2000) == 1000 and warmup_steps(4000) == 1000
    assert warmup_steps(5000) == 2500 and warmup_steps(15000) == 2500
    assert warmup_steps(40000) == 5000 and warmup_steps(300000) == 5000
    assert warmup_steps(10000, "moe") == 2500 and warmup_steps(19999, "moe") == 2500
    assert warmup_steps(20000, "moe") == 5000
    assert warmup_steps(50) == 5                 # demo runs: 10%
    # A 2.5B-token run (1,192 steps): the paper's 1k, overlapping the cool-down (last 20%)...
    assert warmup_plan(1192) == (1000, "paper (overlaps the cool-down)")
    assert warmup_plan(3000, "moe") == (2500, "paper (overlaps the cool-down)")
    # ...but a warm-up as long as the run cannot be followed: it ends where the cool-down starts.
    w, note = warmup_plan(1192, "moe")
    assert w == int(0.8 * 1192) and note.startswith("deviation")
    assert warmup_plan(50)[1].startswith("below the paper's range") and warmup_plan(2000)[1] == "paper"
    assert parse_amount("2.5B") == 2.5e9 and parse_amount("3e19") == 3e19 and parse_amount("600M") == 6e8


def test_plan_sweep_steps_lr_and_commands():
    runs = plan_sweep(SweepConfig(kind="early", presets=["275m", "932m"], tokens=[5e9, 20e9], flops=[1e20]))
    assert len(runs) == 6
    r = runs[0]
    assert r.steps == round(5e9 / (2048 * 1024)) and r.D == r.steps * 2048 * 1024
    assert r.lr == 1.5e-3 and runs[3].lr == 5e-4
    assert r.config == "pretrain/configs/paper/early_275m.yaml"
    assert r.overrides["train"]["max_steps"] == r.steps and r.overrides["train"]["cooldown_fraction"] == 0.2
    cmd = shlex.split(r.command)
    assert cmd[0] == f"CONFIG={r.config}" and cmd[1] == "./launch.sh"
    assert f"train.max_steps={r.steps}" in cmd and f"run.dir={r.run_dir}" in cmd
    flop_run = runs[2]
    assert flop_run.C == pytest.approx(1e20, rel=1e-3)
    late = plan_sweep(SweepConfig(kind="late", presets=["289m"], flops=[1e20]))[0]
    p = get_preset("late", "289m")
    assert late.N_v == p.vision_params > 0 and late.N + late.N_v == pytest.approx(289e6)
    assert late.C == pytest.approx(1e20, rel=1e-3)


def test_demo_sweep_with_base_config_and_widths():
    runs = plan_sweep(SweepConfig(kind="early", presets=[], widths=[64, 128], tokens=[40960],
                                  base_config="pretrain/configs/demo.yaml", global_batch_size=4, seq_len=256))
    assert [r.name for r in runs] == ["early_w64_D40.96K", "early_w128_D40.96K"]
    r = runs[1]
    assert r.config == "pretrain/configs/demo.yaml" and r.steps == 40 and r.warmup_steps == 4
    assert r.overrides["model"]["width"] == 128 and "lr" not in r.overrides["train"]
    # The manifest gives the base config's learning rate (not nan) and every run its own name.
    with open(os.path.join(ROOT, "pretrain/configs/demo.yaml")) as f:
        assert r.lr == yaml.safe_load(f)["train"]["lr"]
    assert [x.overrides["run"]["name"] for x in runs] == [x.name for x in runs]
    assert all(f"run.name={x.name}" in shlex.split(x.command) for x in runs)
    # Without --params, N comes from the repo's accounting of the base config at that width.
    from pretrain.accounting import param_counts
    from pretrain.config import load_config
    n64 = param_counts(load_config("pretrain/configs/demo.yaml", ["model.width=64"]).model).decoder_params
    r = plan_sweep(SweepConfig(kind="early", presets=[], widths=[64], flops=[6e12],
                               base_config="pretrain/configs/demo.yaml", global_batch_size=1, seq_len=1000))[0]
    assert r.N == n64 and r.C == pytest.approx(6e12, rel=1e-3)
    r = plan_sweep(SweepConfig(kind="early", presets=[], widths=[64], params=[1e6], flops=[6e12],
                               base_config="x.yaml", global_batch_size=1, seq_len=1000))[0]
    assert r.D == 1e6 and r.C == pytest.approx(6e12)


def _fake_run(run_dir, kind, N, D, law, steps, finished=True, sources=True, rng=None):
    os.makedirs(run_dir, exist_ok=True)
    loss = float(law.predict(N, D) * np.exp(rng.normal(0, 0.002)))
    config = {"run": {"dir": run_dir}, "model": {"kind": kind, "width": 64, "depth": 2},
              "data": {"seq_len": 32, "sources": ["caption", "interleaved", "text"]},
              "train": {"max_steps": steps, "global_batch_size": 4, "lr": 1e-3, "warmup_steps": 2,
                        "cooldown_fraction": 0.2}}
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(config, f)
    ev = {"loss/caption": loss - 0.3, "loss/interleaved": loss + 0.1, "loss/text": loss + 0.2}
    ev["loss/avg"] = float(np.mean(list(ev.values())))
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"type": "train", "step": 1, "loss": 9.0, "lr": 1e-4, "tokens": 128}) + "\n")
        f.write(json.dumps({"type": "eval", "step": steps, "tokens": D, **ev}) + "\n")
    if finished:
        summary = {"finished": True, "step": steps, "tokens": D, "params": N, "total_params": N,
                   "vision_params": 0, "vision_tokens": 0, "flops": 6 * N * D, "kind": kind,
                   "eval": ev if sources else {"loss/avg": ev["loss/avg"]}}
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f)
    return ev


def test_collect_runs_contract(tmp_path):
    law = ScalingLaw(E=1.9, A=400.0, B=2500.0, alpha=0.3, beta=0.34)
    rng = np.random.default_rng(0)
    ev = _fake_run(str(tmp_path / "a"), "early", 1e8, 1e10, law, 100, rng=rng)
    _fake_run(str(tmp_path / "b"), "early", 2e8, 1e10, law, 100, finished=False, rng=rng)
    os.makedirs(tmp_path / "c")
    with open(tmp_path / "c" / "summary.json", "w") as f:       # finished, but no eval in the summary
        json.dump({"finished": True, "step": 7, "tokens": 5e9, "params": 3e8, "kind": "late",
                   "vision_params": 1e8, "vision_tokens": 2e9}, f)
    with open(tmp_path / "c" / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"type": "eval", "step": 7, "loss/caption": 2.0, "loss/text": 3.0}) + "\n")
    with pytest.warns(UserWarning, match="unfinished"):
        rows = collect_runs([str(tmp_path)])
    by = {r["name"]: r for r in rows}
    assert set(by) == {"a", "c"}
    a = by["a"]
    assert a["loss"] == pytest.approx(ev["loss/avg"]) and a["loss_caption"] == pytest.approx(ev["loss/caption"])
    assert a["N"] == 1e8 and a["D"] == 1e10 and a["C"] == pytest.approx(6e18) and a["width"] == 64
    c = by["c"]
    assert c["loss"] == pytest.approx(2.5)                         # mean of the sources
    assert c["C"] == pytest.approx(6 * (3e8 * 5e9 + 1e8 * 2e9))    # 6 (N D + N_v D_v)


def test_sweep_collect_fit_end_to_end(tmp_path):
    law = ScalingLaw(E=1.9, A=400.0, B=2500.0, alpha=0.3, beta=0.34)
    sweep_dir = tmp_path / "sweep"
    runs_root = tmp_path / "runs"
    _tool("sweep").main(["--kind", "early", "--presets", "275m,468m,932m,1.63b,2.28b",
                         "--tokens", "2.5e9,5e9,1e10,2e10,5e10,1e11", "--out", str(sweep_dir),
                         "--runs-root", str(runs_root), "--set", "train.eval_every=10"])
    with open(sweep_dir / "manifest.csv") as f:
        manifest = list(csv.DictReader(f))
    assert len(manifest) == 30
    over = yaml.safe_load(open(sweep_dir / "overrides" / f"{manifest[0]['name']}.yaml"))
    assert over["train"]["eval_every"] == 10 and over["train"]["max_steps"] == int(manifest[0]["steps"])
    commands = open(sweep_dir / "commands.sh").read().splitlines()
    assert sum(c.startswith("CONFIG=") for c in commands) == 30
    # "Train": each run directory gets the files the trainer writes, losses drawn from `law`.
    rng = np.random.default_rng(0)
    for m in manifest:
        _fake_run(m["run_dir"], "early", float(m["N"]), float(m["D"]), law, int(m["steps"]), rng=rng)
    _fake_run(str(runs_root / "sweep" / "crashed"), "early", 3e8, 1e9, law, 5, finished=False, rng=rng)
    runs_csv = tmp_path / "RUNS.csv"
    _tool("collect_runs").main([str(runs_root / "sweep"), "--out", str(runs_csv)])
    rows = read_runs_csv(str(runs_csv))
    assert len(rows) == 30 and {"loss", "loss_caption", "loss_interleaved", "loss_text"} <= set(rows[0])
    out = tmp_path / "fit"
    _tool("fit_scaling_laws").main([str(runs_csv), "--out", str(out), "--bootstrap", "10",
                                    "--targets", "avg,caption", "--min-flops", "1e19"])
    fit = json.load(open(out / "fit.json"))
    for k in ("E", "A", "B", "alpha", "beta", "a", "b", "d", "c"):
        assert fit[k] is not None and np.isfinite(fit[k]), k
    assert set(fit["bootstrap"]["std"]) >= {"E", "alpha", "beta", "a", "b", "d"}
    assert fit["extrapolation"]["held_out"]["n"] == 6
    assert set(fit["fits"]["early"]) == {"avg", "caption"}
    # avg = mean of the sources = law + 0 here, so the fit sees law-shaped losses
    assert abs(fit["fits"]["early"]["caption"]["E"] - (fit["E"] - 0.3)) < 0.25
    report = open(out / "report.md").read()
    assert "Table 2" in report and "| early fusion | avg |" in report
    for png in ("loss_vs_flops.png", "observed_vs_predicted.png", "optimal_vs_compute.png", "frontiers.png",
                "loss_vs_flops_caption.png"):  # Figure 1 top; Figures 27/28 per source
        assert (out / png).stat().st_size > 10_000
    # Five presets span 275M-2.28B, under a decade: the fit says so rather than staying silent.
    assert "## Warnings" in report and "model sizes N span 8.29x" in report
    assert any("model sizes N span" in w for w in fit["fits"]["early"]["avg"]["warnings"])
