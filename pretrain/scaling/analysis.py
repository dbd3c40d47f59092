"""The whole scaling-law analysis of a runs table: per model kind and per loss target, the fit
of Eq. 1, derived exponents (closed form and regression), the hull exponent c, bootstrap spreads,
held-out extrapolation and optionally the sparse law. `tools/fit_scaling_laws.py` is a thin
wrapper around `analyse` + `report.write_outputs`.

Targets: `avg` is the `loss` column (the average of the sources, the paper's main target);
`caption`, `interleaved`, `text`, ... are the `loss_<source>` columns, fitted when every run of
the kind has them.

    from pretrain.scaling.analysis import AnalysisConfig, analyse
    from pretrain.scaling.runs import read_runs_csv
    result = analyse(read_runs_csv("RUNS.csv"), AnalysisConfig(bootstrap=100))
"""
from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from .bootstrap import bootstrap
from .derived import LateFusionFlops, closed_form, regression
from .diagnostics import fit_warnings
from .fit import FitConfig, fit_scaling_law
from .hull import DEFAULT_MIN_FLOPS, fit_hull_exponent
from .runs import column
from .sparse import fit_sparse_law
from .validation import extrapolation, prediction_metrics


@dataclass
class AnalysisConfig:
    targets: list | None = None         # e.g. ["avg", "caption"]; None: every target present
    kinds: list | None = None           # None: every kind in the table (rows without kind: "all")
    bootstrap: int = 100                # resamples; 0 disables
    seed: int = 0
    min_flops: float = DEFAULT_MIN_FLOPS   # hull threshold: budgets at or below are excluded
    hull_spacing: str = "linear"        # budgets sampled on the hull: "linear" (paper) or "log"
    holdout: bool = True                # held-out extrapolation (fit small models, predict large)
    holdout_params: float | None = None # runs with N >= this are held out (None: the largest size)
    sparse: bool = False                # also fit the sparsity-aware law (Table 12) for kinds with
                                        # sparse runs (S > 0), jointly with the dense early runs
    fit: FitConfig = field(default_factory=FitConfig)


@dataclass
class TargetResult:
    kind: str
    target: str
    n_runs: int
    fit: dict                    # E, A, B, alpha, beta, objective, seconds, ...
    closed_form: dict
    regression: dict
    hull: dict | None = None
    bootstrap: dict | None = None
    held_in: dict | None = None  # prediction errors of the full fit on its own runs
    extrapolation: dict | None = None
    sparse: dict | None = None
    notes: list = field(default_factory=list)
    warnings: list = field(default_factory=list)  # degenerate / weakly identified fit (diagnostics.py)

    def coefficients(self) -> dict:
        """The Table 2 row: E, A, B, alpha, beta; a, b, d, n, dn (regression); c, K_c."""
        out = {k: self.fit[k] for k in ("E", "A", "B", "alpha", "beta")}
        out.update({k: self.regression[k] for k in ("a", "b", "d", "n", "dn")})
        out["c"] = self.hull["c"] if self.hull else None
        out["K_c"] = self.hull["K"] if self.hull else None
        return out


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def target_column(target: str) -> str:
    return "loss" if target == "avg" else f"loss_{target}"


def available_targets(rows: list[dict]) -> list[str]:
    targets = []
    if all(r.get("loss") is not None for r in rows) or all(r.get("loss_avg") is not None for r in rows):
        targets.append("avg")
    keys = sorted({k for r in rows for k in r if k.startswith("loss_") and k != "loss_avg"})
    targets += [k[5:] for k in keys if all(r.get(k) is not None for r in rows)]
    return targets


def analyse_target(rows: list[dict], kind: str, target: str, cfg: AnalysisConfig, log=_log,
                   sparse_rows: list[dict] | None = None) -> TargetResult:
    col = target_column(target)
    if target == "avg" and any(r.get("loss") is None for r in rows):
        col = "loss_avg"
    N, D, L = column(rows, "N"), column(rows, "D"), column(rows, col)
    C = column(rows, "C")
    N_v, D_v = column(rows, "N_v", 0.0), column(rows, "D_v", 0.0)
    missing_C = ~np.isfinite(C)
    C[missing_C] = 6.0 * (N[missing_C] * D[missing_C] + N_v[missing_C] * D_v[missing_C])
    notes = []
    log(f"{kind}/{target}: fitting Eq. 1 on {N.size} runs from {cfg.fit.grid().shape[0]} starts")
    fr = fit_scaling_law(N, D, L, cfg.fit)
    law = fr.law
    log(f"{kind}/{target}: E={law.E:.4f} alpha={law.alpha:.4f} beta={law.beta:.4f} ({fr.seconds:.2f} s)")
    late = None
    if np.any(N_v > 0) and np.any(D_v > 0):
        late = LateFusionFlops.from_runs(N, N_v, D, D_v)
        notes.append(f"late fusion: N_v = {late.p:.4g} N + {late.q:.4g}, D_v = {late.rho:.3f} D; "
                     "closed form assumes C = 6ND, the regression uses the late-fusion FLOPs")
    cf = closed_form(law.alpha, law.beta, law.A, law.B)
    reg = regression(law, C, late=late)
    hull = None
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            h = fit_hull_exponent(C, L, cfg.min_flops, spacing=cfg.hull_spacing)
        notes += [str(x.message) for x in w]
        hull = h.to_dict()
    except ValueError as e:
        notes.append(f"hull exponent skipped: {e}")
    result = TargetResult(kind=kind, target=target, n_runs=int(N.size),
                          fit={**law.to_dict(), "objective": fr.objective, "seconds": fr.seconds,
                               "n_starts": fr.n_starts, "n_converged": fr.n_converged},
                          closed_form=cf.to_dict(), regression=reg.to_dict(), hull=hull,
                          held_in=prediction_metrics(L, law.predict(N, D)), notes=notes)
    if cfg.bootstrap > 0:
        log(f"{kind}/{target}: bootstrap, {cfg.bootstrap} resamples")
        try:
            bs = bootstrap(N, D, L, fr, n_resamples=cfg.bootstrap, seed=cfg.seed, config=cfg.fit, C=C,
                           min_flops=cfg.min_flops, progress=log)
            result.bootstrap = bs.to_dict()
        except ValueError as e:
            notes.append(f"bootstrap skipped: {e}")
    result.warnings = fit_warnings(N, D, law.to_dict(), cfg.fit, result.bootstrap)
    for w in result.warnings:
        log(f"WARNING {kind}/{target}: {w}")
    if cfg.holdout:
        try:
            log(f"{kind}/{target}: held-out extrapolation")
            result.extrapolation = extrapolation(N, D, L, cfg.holdout_params, cfg.fit).to_dict()
        except ValueError as e:
            notes.append(f"extrapolation skipped: {e}")
    if sparse_rows:
        sN, sD, sL = column(sparse_rows, "N"), column(sparse_rows, "D"), column(sparse_rows, col)
        S = column(sparse_rows, "S", 0.0)
        S[~np.isfinite(S)] = 0.0
        log(f"{kind}/{target}: sparse law (Abnar et al.) on {len(sparse_rows)} runs, "
            f"sparsity levels {sorted(set(S.round(4).tolist()))}")
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            sp = fit_sparse_law(sN, sD, S, sL)
        notes += [str(x.message) for x in w]
        result.sparse = {**sp.law.to_dict(), "objective": sp.objective, "seconds": sp.seconds,
                         "n_runs": len(sparse_rows), "held_in": prediction_metrics(sL, sp.law.predict(sN, sD, S))}
    return result


@dataclass
class Analysis:
    results: list                     # TargetResult, one per (kind, target)
    config: AnalysisConfig
    rows: dict = field(default_factory=dict)   # kind -> rows used

    def get(self, kind: str, target: str = "avg") -> TargetResult | None:
        return next((r for r in self.results if r.kind == kind and r.target == target), None)

    def primary(self) -> TargetResult:
        """The `avg` fit of the first kind (else the first result)."""
        return next((r for r in self.results if r.target == "avg"), self.results[0])


def _sparse_rows(krows, by_kind, target) -> list[dict] | None:
    """Runs for the sparse law of a kind with sparse runs (S > 0): its own runs plus the dense
    early-fusion runs when the table has them (several sparsity levels make the S terms
    identifiable). None for dense kinds."""
    if not any((r.get("S") or 0) > 0 for r in krows):
        return None
    dense = [r for r in by_kind.get("early", []) if not (r.get("S") or 0) > 0]
    col = target_column(target)
    extra = [r for r in dense if r.get(col) is not None]
    return krows + extra


def analyse(rows: list[dict], cfg: AnalysisConfig | None = None, log=_log) -> Analysis:
    cfg = cfg or AnalysisConfig()
    by_kind: dict = {}
    for r in rows:
        by_kind.setdefault(str(r.get("kind") or "all"), []).append(r)
    kinds = cfg.kinds or list(by_kind)
    results = []
    used = {}
    for kind in kinds:
        krows = by_kind.get(kind, [])
        if len(krows) < 5:
            log(f"{kind}: {len(krows)} runs, need at least 5 to fit; skipped")
            continue
        used[kind] = krows
        targets = cfg.targets or available_targets(krows)
        for t in targets:
            if t not in available_targets(krows):
                log(f"{kind}: no complete '{target_column(t)}' column; target {t} skipped")
                continue
            sparse_rows = _sparse_rows(krows, by_kind, t) if cfg.sparse else None
            results.append(analyse_target(krows, kind, t, cfg, log, sparse_rows))
    if not results:
        raise ValueError("nothing to fit: need at least 5 runs of one kind with a loss column")
    return Analysis(results=results, config=cfg, rows=used)
