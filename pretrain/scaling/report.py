"""Write an analysis to disk: `fit.json`, `report.md` (tables shaped like the paper's Tables 2,
9, 10, 11, 12) and the plots.

`fit.json` holds, at top level, the primary fit (kind's `avg` target): `E, A, B, alpha, beta`,
`a, b, d, n, dn` (by regression, as the paper's Table 2), `c, K_c` (hull), `closed_form`,
`bootstrap` (`mean`, `std`), `extrapolation`; and under `fits[kind][target]` the same for every fit.

    from pretrain.scaling.report import write_outputs
    write_outputs(analysis, "out/")
"""
from __future__ import annotations

import json
import math
import os

from .plots import KIND_LABEL, plot_all

PAPER_EARLY_AVG = {"E": 1.904, "alpha": 0.301, "beta": 0.335, "a": 0.5262, "b": 0.473, "c": -0.0492, "d": 0.8987}


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if hasattr(x, "item"):
        return _jsonable(x.item())
    return x


def _result_dict(r) -> dict:
    d = r.coefficients()
    d.update({"kind": r.kind, "target": r.target, "n_runs": r.n_runs, "objective": r.fit["objective"],
              "fit_seconds": r.fit["seconds"], "closed_form": r.closed_form, "regression": r.regression,
              "hull": r.hull, "held_in": r.held_in, "bootstrap": r.bootstrap, "extrapolation": r.extrapolation,
              "sparse": r.sparse, "notes": r.notes, "warnings": r.warnings})
    return d


def fit_json(analysis) -> dict:
    p = analysis.primary()
    out = {"primary": {"kind": p.kind, "target": p.target}, **_result_dict(p)}
    out["fits"] = {}
    for r in analysis.results:
        out["fits"].setdefault(r.kind, {})[r.target] = _result_dict(r)
    cfg = analysis.config
    out["settings"] = {"huber_delta": cfg.fit.huber_delta, "n_starts": int(cfg.fit.grid().shape[0]),
                       "bootstrap": cfg.bootstrap, "seed": cfg.seed, "min_flops": cfg.min_flops,
                       "holdout_params": cfg.holdout_params, "sparse": cfg.sparse}
    return _jsonable(out)


def _f(x, digits=4):
    if x is None:
        return "—"
    if isinstance(x, float) and (abs(x) >= 1e4 or (0 < abs(x) < 1e-3)):
        return f"{x:.4g}"
    return f"{x:.{digits}f}"


def report_markdown(analysis, plots: list[str]) -> str:
    L = ["# Scaling-law fit", ""]
    L.append("Fit of `L = E + A/N^α + B/D^β` (Huber δ = 1e-3 on log-space residuals, summed; L-BFGS from "
             f"{analysis.config.fit.grid().shape[0]} starts, best kept). `a, b, d` by regression over the "
             "compute-optimal scan (appendix C.2); `c` from the lower convex hull above "
             f"{analysis.config.min_flops:.3g} FLOPs.")
    warned = [(r, w) for r in analysis.results for w in r.warnings]
    if warned:
        L += ["", "## Warnings", "", "**Some fits below are degenerate or weakly identified; read their "
              "coefficients as such** (pretrain/scaling/diagnostics.py):", ""]
        L += [f"- {KIND_LABEL.get(r.kind, r.kind)} / {r.target}: {w}" for r, w in warned]
    L += ["", "## Table 2: scaling laws", "",
          "| Model | Data | runs | E | α | β | a | b | c | d |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in analysis.results:
        c = r.coefficients()
        L.append(f"| {KIND_LABEL.get(r.kind, r.kind)} | {r.target} | {r.n_runs} | {_f(c['E'], 3)} | {_f(c['alpha'])} "
                 f"| {_f(c['beta'])} | {_f(c['a'])} | {_f(c['b'])} | {_f(c['c'])} | {_f(c['d'])} |")
    p = PAPER_EARLY_AVG
    L.append(f"| *paper, early fusion* | *avg* | | *{p['E']}* | *{p['alpha']}* | *{p['beta']}* | *{p['a']}* "
             f"| *{p['b']}* | *{p['c']}* | *{p['d']}* |")
    L += ["", "A, B and the hull constant K (L = K C^c):", "",
          "| Model | Data | A | B | K |", "|---|---|---|---|---|"]
    for r in analysis.results:
        c = r.coefficients()
        L.append(f"| {KIND_LABEL.get(r.kind, r.kind)} | {r.target} | {_f(c['A'], 2)} | {_f(c['B'], 2)} | {_f(c['K_c'], 3)} |")
    L += ["", "## Table 9: closed form vs regression", "",
          "| Model | Data | method | a | b | d | n | dn |", "|---|---|---|---|---|---|---|---|"]
    for r in analysis.results:
        for name, ex in (("closed form", r.closed_form), ("regression", r.regression)):
            L.append(f"| {KIND_LABEL.get(r.kind, r.kind)} | {r.target} | {name} | {_f(ex['a'], 5)} | {_f(ex['b'], 5)} "
                     f"| {_f(ex['d'], 5)} | {_f(ex['n'], 5)} | {_f(ex['dn'], 5)} |")
    L += ["", "## Table 10: prediction errors", "",
          "| Model | Data | set | runs | MSE | R² | MAE (%) |", "|---|---|---|---|---|---|---|"]
    for r in analysis.results:
        rows = [("all runs, full fit", r.held_in)]
        if r.extrapolation:
            split = r.extrapolation["split_params"]
            rows += [(f"held-in (N < {split:.3g})", r.extrapolation["held_in"]),
                     (f"held-out (N ≥ {split:.3g})", r.extrapolation["held_out"])]
        for name, m in rows:
            L.append(f"| {KIND_LABEL.get(r.kind, r.kind)} | {r.target} | {name} | {m['n']} | {_f(m['MSE'], 5)} "
                     f"| {_f(m['R2'])} | {_f(m['MAE_percent'])} |")
    if any(r.bootstrap for r in analysis.results):
        keys = ("E", "alpha", "beta", "a", "b", "d", "c")
        L += ["", "## Table 11: bootstrap (mean ± std)", "",
              "| Model | Data | resamples | " + " | ".join(keys) + " |", "|---|---|---|" + "---|" * len(keys)]
        for r in analysis.results:
            if not r.bootstrap:
                continue
            b = r.bootstrap
            cells = [f"{_f(b['mean'].get(k))} ± {_f(b['std'].get(k))}" for k in keys]
            L.append(f"| {KIND_LABEL.get(r.kind, r.kind)} | {r.target} | {b['n_resamples']} | " + " | ".join(cells) + " |")
        L.append("")
        L.append("(a, b, d here are closed-form per resample, as fast as the fit itself.)")
    if any(r.sparse for r in analysis.results):
        keys = ("E", "A", "B", "alpha", "beta", "lam", "delta", "gamma", "C", "d")
        L += ["", "## Table 12: sparsity-aware law (Abnar et al., 2025)", "",
              "`L = A/N^α + B/D^β + C/(1-S)^λ + d/((1-S)^δ N^γ) + E`", "",
              "Fitted on the kind's runs plus the dense early-fusion runs (S = 0) when present.", "",
              "| Model | Data | runs | " + " | ".join(keys) + " | R² |", "|---|---|---|" + "---|" * (len(keys) + 1)]
        for r in analysis.results:
            if r.sparse:
                L.append(f"| {KIND_LABEL.get(r.kind, r.kind)} | {r.target} | {r.sparse['n_runs']} | "
                         + " | ".join(_f(r.sparse[k]) for k in keys) + f" | {_f(r.sparse['held_in']['R2'])} |")
    notes = [(r, n) for r in analysis.results for n in r.notes]
    if notes:
        L += ["", "## Notes", ""] + [f"- {r.kind}/{r.target}: {n}" for r, n in notes]
    if plots:
        L += ["", "## Figures", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    return "\n".join(L) + "\n"


def write_outputs(analysis, out_dir: str, plots: bool = True) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    paths = plot_all(analysis, out_dir) if plots else []
    with open(os.path.join(out_dir, "fit.json"), "w") as f:
        json.dump(fit_json(analysis), f, indent=2)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(report_markdown(analysis, paths))
    return {"fit_json": os.path.join(out_dir, "fit.json"), "report": os.path.join(out_dir, "report.md"),
            "plots": paths}
