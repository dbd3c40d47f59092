"""Is a fit of Eq. 1 worth reading? Warnings for degenerate or weakly identified fits.

Eq. 1 has five free parameters (E, A, B, alpha, beta). With few runs, or runs that barely vary
N or D, the Huber objective has long flat valleys and L-BFGS happily walks off to absurd values
(six tiny demo runs gave E = 3e-112, beta = 36.7, B = 7e154 and a perfect-looking fit). Each
check below names what is wrong and why it matters; `pretrain.scaling.analysis` prints them on the
console and `report.md` lists them in a "Warnings" section above the tables.

Checks:
- runs: fewer than `MIN_RUNS_PER_PARAM` (3) runs per fitted parameter (15 for Eq. 1);
- spread: model sizes N (or token counts D) spanning less than a decade (max/min < 10): the
  exponent of that axis is then barely constrained;
- grid: a fitted parameter (log A, log B, log E, alpha, beta) outside the range of the start grid
  (appendix C.1's grid, `FitConfig`): the optimum is not where the paper's search looked, usually
  a sign of a degenerate direction (E -> 0 with B -> infinity, say);
- bootstrap: a coefficient whose bootstrap standard deviation exceeds its own magnitude.
"""
from __future__ import annotations

import math

import numpy as np

MIN_RUNS_PER_PARAM = 3
N_PARAMS = 5
MIN_DECADES = 1.0
_GRID_PARAMS = {"a": ("A", "grid_a", "log A"), "b": ("B", "grid_b", "log B"), "e": ("E", "grid_e", "log E"),
                "alpha": ("alpha", "grid_alpha", "alpha"), "beta": ("beta", "grid_beta", "beta")}


def _decades(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x) & (x > 0)]
    return float(np.log10(x.max() / x.min())) if x.size else 0.0


def fit_warnings(N, D, fit: dict, fit_config, bootstrap: dict | None = None) -> list[str]:
    """Warnings about one Eq. 1 fit (`fit` holds E, A, B, alpha, beta); empty when it looks sound."""
    out = []
    n = int(np.asarray(N).size)
    need = MIN_RUNS_PER_PARAM * N_PARAMS
    if n < need:
        out.append(f"only {n} runs for {N_PARAMS} parameters (fewer than {need}, {MIN_RUNS_PER_PARAM} per "
                   f"parameter): the fit is weakly identified")
    for name, x in (("model sizes N", N), ("token counts D", D)):
        dec = _decades(x)
        if dec < MIN_DECADES:
            out.append(f"{name} span {10 ** dec:.3g}x (less than a decade): the exponent of that axis "
                       f"is weakly identified")
    for key, (coef, grid_name, label) in _GRID_PARAMS.items():
        value = fit.get(coef)
        if value is None:
            continue
        log_scale = key in ("a", "b", "e")
        v = (math.log(value) if value > 0 else -math.inf) if log_scale else value
        grid = getattr(fit_config, grid_name)
        lo, hi = min(grid), max(grid)
        if not lo - 1e-9 <= v <= hi + 1e-9:
            out.append(f"{label} = {v:.4g} lies outside the start grid [{lo:g}, {hi:g}] ({coef} = {value:.3g}): "
                       f"a degenerate or weakly constrained direction")
    if bootstrap:
        for coef in ("E", "A", "B", "alpha", "beta"):
            est, sd = fit.get(coef), bootstrap.get("std", {}).get(coef)
            if est is not None and sd is not None and np.isfinite(sd) and sd > abs(est):
                out.append(f"bootstrap std of {coef} ({sd:.3g}) exceeds the estimate ({est:.3g})")
    return out
