"""Bootstrap spreads of the fitted coefficients (appendix C.6, Table 11).

Each resample draws P runs with replacement from the P runs (as in the paper) and refits Eq. 1.
A resample is a vector of counts, used as per-run weights in the summed Huber objective, so all
resamples run together in one batched L-BFGS: rows are (resample, start) pairs. Starts are the
`k` best distinct optima of the full-data fit rather than the 4,500-point grid (the basins are
already known; the full grid per resample would cost 100x the main fit); pass
`starts="grid"` for the paper-literal variant. Each resample's best row is then polished (tight tolerances, batched).

Coefficients reported: E, A, B, alpha, beta and the closed-form a, b, d, n, dn; c (hull exponent)
when budgets are given.

    from pretrain.scaling.bootstrap import bootstrap
    bootstrap(N, D, L, fit_result, n_resamples=100).std["alpha"]
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from .derived import closed_form
from .fit import FitConfig, FitResult, make_value_and_grad, polish, torch_threads
from .hull import DEFAULT_MIN_FLOPS, fit_hull_exponent
from .law import ScalingLaw
from .lbfgs import batched_lbfgs

COEFFS = ("E", "A", "B", "alpha", "beta", "a", "b", "d", "n", "dn")


@dataclass
class BootstrapResult:
    n_resamples: int
    mean: dict = field(default_factory=dict)
    std: dict = field(default_factory=dict)
    samples: dict = field(default_factory=dict)   # coefficient -> list over resamples

    def to_dict(self, with_samples: bool = False) -> dict:
        out = {"n_resamples": self.n_resamples, "mean": self.mean, "std": self.std}
        if with_samples:
            out["samples"] = self.samples
        return out


def bootstrap(N, D, L, base: FitResult, n_resamples: int = 100, seed: int = 0, k_starts: int = 16,
              starts: str | np.ndarray = "best", config: FitConfig | None = None, C=None,
              min_flops: float = DEFAULT_MIN_FLOPS, progress=None) -> BootstrapResult:
    """Refit Eq. 1 on `n_resamples` resamples of the runs; mean and std of every coefficient."""
    cfg = config or FitConfig()
    N, D, L = (np.asarray(v, dtype=np.float64) for v in (N, D, L))
    P = N.size
    rng = np.random.default_rng(seed)
    counts = np.stack([np.bincount(rng.integers(0, P, P), minlength=P) for _ in range(n_resamples)])
    if isinstance(starts, str):
        x0 = cfg.grid() if starts == "grid" else base.best_distinct(k_starts)
    else:
        x0 = np.asarray(starts, dtype=np.float64)
    K = x0.shape[0]
    logN, logD, logL = np.log(N), np.log(D), np.log(L)
    rows_x0 = np.tile(x0, (n_resamples, 1))                       # row r*K + s
    w_SR = torch.as_tensor(np.repeat(counts, K, axis=0).astype(np.float64))
    with torch_threads(cfg.num_threads):
        fg = make_value_and_grad(logN, logD, logL, cfg.huber_delta, w_SR)
        res = batched_lbfgs(fg, torch.as_tensor(rows_x0), cfg.lbfgs)
    f = res.f_S.numpy().reshape(n_resamples, K)
    x = res.x_SP.numpy().reshape(n_resamples, K, 5)
    samples = {k: [] for k in COEFFS}
    if C is not None:
        samples["c"] = []
    best = np.array([int(np.argmin(np.where(np.isfinite(f[r]), f[r], np.inf))) for r in range(n_resamples)])
    x_best = x[np.arange(n_resamples), best]
    f_best = f[np.arange(n_resamples), best]
    with torch_threads(cfg.num_threads):
        xp, fp = polish(x_best, logN, logD, logL, cfg.huber_delta, counts.astype(np.float64))
    if progress:
        progress(f"bootstrap: {n_resamples} resamples fitted")
    diverged = 0
    for r in range(n_resamples):
        xb = xp[r] if fp[r] <= f_best[r] else x_best[r]
        if not np.all(np.isfinite(xb)) or np.max(np.abs(xb[:3])) > 700:  # exp() would overflow
            # A resample of few or degenerate runs can drive a coefficient off to infinity; it
            # carries no information about the spread, so it is dropped (and counted) rather
            # than crashing the whole analysis.
            diverged += 1
            continue
        law = ScalingLaw.from_log_params(*xb)
        ex = closed_form(law.alpha, law.beta)
        for k, v in {**law.to_dict(), **{k: getattr(ex, k) for k in ("a", "b", "d", "n", "dn")}}.items():
            samples[k].append(float(v))
        if C is not None:
            sel = counts[r] > 0
            Cr, Lr = np.asarray(C, dtype=np.float64)[sel], L[sel]
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    samples["c"].append(fit_hull_exponent(Cr, Lr, min_flops).c)
            except ValueError:
                samples["c"].append(float("nan"))
    if diverged and progress:
        progress(f"bootstrap: {diverged} of {n_resamples} resamples diverged and were dropped")
    if diverged == n_resamples:
        raise ValueError("bootstrap: every resample diverged; too few or degenerate runs to fit")
    mean = {k: float(np.nanmean(v)) for k, v in samples.items()}
    std = {k: float(np.nanstd(v, ddof=1)) if len(v) > 1 else 0.0 for k, v in samples.items()}
    return BootstrapResult(n_resamples=n_resamples, mean=mean, std=std, samples=samples)
