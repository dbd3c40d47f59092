"""Collect finished runs into a table (`RUNS.csv`) for the fit.

A run directory (written by `pretrain.train`) holds `config.yaml` (the resolved config: `run`,
`model`, `data`, `train`), `metrics.jsonl` (train and eval lines) and, once training finished,
`summary.json`: `{"finished": true, "step", "tokens" (D), "params" (N, active for MoE),
"total_params", "vision_params" (N_v), "vision_tokens" (D_v), "flops" (C), "kind",
"eval": {"loss/caption": ..., "loss/avg": ...}}`. Runs without a finished summary are skipped
with a warning. Columns: `name, run_dir, kind, N, D, C, N_total, N_v, D_v, S, steps, loss`
(`loss` = the final `loss/avg`), one `loss_<source>` per evaluated source, and a few config
fields for reference. When the summary lacks `loss/avg`, the mean of the per-source losses is
used; when it lacks FLOPs, `C = 6 (N D + N_v D_v)`.

    python tools/collect_runs.py runs/sweep_early/* --out runs/sweep_early/RUNS.csv
"""
from __future__ import annotations

import csv
import json
import os
import warnings

import numpy as np
import yaml

from .sparse import sparsity

BASE_COLUMNS = ("name", "run_dir", "kind", "N", "D", "C", "N_total", "N_v", "D_v", "S", "steps", "loss")
CONFIG_COLUMNS = {"width": ("model", "width"), "depth": ("model", "depth"), "lr": ("train", "lr"),
                  "max_steps": ("train", "max_steps"), "warmup_steps": ("train", "warmup_steps"),
                  "global_batch_size": ("train", "global_batch_size"), "seq_len": ("data", "seq_len")}


def _get(tree, *keys):
    for k in keys:
        if not isinstance(tree, dict) or k not in tree:
            return None
        tree = tree[k]
    return tree


def _last_eval(metrics_path: str) -> dict:
    last = {}
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue       # a line cut by a crash
                if rec.get("type") == "eval":
                    last = rec
    return {k: v for k, v in last.items() if k.startswith("loss/")}


def _sparsity_from_config(config: dict, kind: str) -> float:
    if kind != "moe":
        return 0.0
    model = config.get("model", {}) if isinstance(config, dict) else {}
    moe = model.get("moe", model) if isinstance(model.get("moe"), dict) else model
    n_exp = next((moe[k] for k in ("num_experts", "n_experts", "experts") if k in moe), None)
    top_k = next((moe[k] for k in ("top_k", "topk", "k") if k in moe), None)
    if n_exp is None or top_k is None:
        return 1.0 - 1.0 / 8.0     # the paper's 8 experts, top-1
    return sparsity(int(n_exp), int(top_k))


def read_run(run_dir: str) -> dict | None:
    """One row for a finished run, or None (with a warning) for an unfinished or broken one."""
    summary_path = os.path.join(run_dir, "summary.json")
    if not os.path.exists(summary_path):
        warnings.warn(f"skipping {run_dir}: no summary.json (unfinished)")
        return None
    try:
        with open(summary_path) as f:
            summary = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        warnings.warn(f"skipping {run_dir}: unreadable summary.json ({e})")
        return None
    if not summary.get("finished", False):
        warnings.warn(f"skipping {run_dir}: summary says unfinished")
        return None
    config = {}
    cfg_path = os.path.join(run_dir, "config.yaml")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            config = yaml.safe_load(f) or {}
    losses = {k: v for k, v in (summary.get("eval") or {}).items() if k.startswith("loss/")}
    if not losses:
        losses = _last_eval(os.path.join(run_dir, "metrics.jsonl"))
    sources = {k.split("/", 1)[1]: float(v) for k, v in losses.items() if k != "loss/avg" and v is not None}
    if "loss/avg" in losses and losses["loss/avg"] is not None:
        loss = float(losses["loss/avg"])
    elif sources:
        loss = float(np.mean(list(sources.values())))
    else:
        warnings.warn(f"skipping {run_dir}: no evaluation loss")
        return None
    kind = summary.get("kind") or _get(config, "model", "kind") or ""
    N = float(summary["params"])
    D = float(summary["tokens"])
    N_v = float(summary.get("vision_params") or 0.0)
    D_v = float(summary.get("vision_tokens") or 0.0)
    C = summary.get("flops")
    C = float(C) if C else 6.0 * (N * D + N_v * D_v)
    row = {"name": os.path.basename(os.path.normpath(run_dir)), "run_dir": run_dir, "kind": kind,
           "N": N, "D": D, "C": C, "N_total": float(summary.get("total_params") or N), "N_v": N_v, "D_v": D_v,
           "S": float(summary["sparsity"]) if "sparsity" in summary else _sparsity_from_config(config, kind),
           "steps": int(summary.get("step") or 0), "loss": loss}
    for src, v in sorted(sources.items()):
        row[f"loss_{src}"] = v
    for col, keys in CONFIG_COLUMNS.items():
        row[col] = _get(config, *keys)
    return row


def find_run_dirs(paths) -> list[str]:
    """Run directories among `paths`: each path itself if it holds a run, else runs below it."""
    found = []
    for p in paths:
        if not os.path.isdir(p):
            warnings.warn(f"not a directory: {p}")
            continue
        markers = ("summary.json", "config.yaml", "metrics.jsonl")
        if any(os.path.exists(os.path.join(p, m)) for m in markers):
            found.append(p)
            continue
        for root, dirs, files in os.walk(p):
            dirs.sort()
            if any(m in files for m in markers):
                found.append(root)
                dirs[:] = []          # a run's subfolders (checkpoints) are not runs
    return found


def collect_runs(paths) -> list[dict]:
    rows = []
    for d in find_run_dirs(paths):
        row = read_run(d)
        if row is not None:
            rows.append(row)
    return rows


def write_runs_csv(rows: list[dict], path: str) -> None:
    loss_cols = sorted({k for r in rows for k in r if k.startswith("loss_")})
    fields = list(BASE_COLUMNS) + loss_cols + list(CONFIG_COLUMNS)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})


def read_runs_csv(path: str) -> list[dict]:
    """Rows of a runs table with numbers parsed; accepts `loss/x` or `loss_x` column names."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        row = {}
        for k, v in r.items():
            if k is None:
                continue
            k = k.strip()
            if k.startswith("loss/"):
                k = "loss" if k == "loss/avg" else "loss_" + k[5:]
            if v is None or v == "":
                row[k] = None
                continue
            try:
                row[k] = float(v)
            except ValueError:
                row[k] = v
        out.append(row)
    return out


def column(rows: list[dict], key: str, default=np.nan) -> np.ndarray:
    return np.array([default if r.get(key) is None else r[key] for r in rows], dtype=np.float64)
