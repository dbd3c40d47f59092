"""Fit `L = E + A/N^alpha + B/D^beta` as in appendix C.1 of the paper (after Hoffmann et al.).

Objective, over runs i (summed, not averaged: averaging shrinks the gradient by the number of
runs so L-BFGS stops early, the flaw Epoch AI found in the original Chinchilla fit):

    sum_i w_i * Huber_delta( LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i ),  delta = 1e-3

minimised by L-BFGS from every point of the grid (4,500 starts: alpha, beta in {0, .5, ..., 2},
a, b in {0, 5, ..., 25}, e in {-1, -.5, ..., 1}; the grid of Hoffmann et al. as transcribed in
paper_tables.yaml, the paper's own text being garbled there), keeping the best. All starts run
at once in `batched_lbfgs` (analytic gradient, float64); the few best end points are then
polished with tight tolerances, so the optimum does not depend on the loose tolerances that keep
the 4,500-start stage fast. `objective_np` is the same objective for one point in numpy, for
checks and for scipy users.

    python -c "from pretrain.scaling.fit import fit_scaling_law; ..."
    # or through the tool: python tools/fit_scaling_laws.py RUNS.csv --out DIR
"""
from __future__ import annotations

import contextlib
import itertools
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .law import ScalingLaw
from .lbfgs import LBFGSConfig, batched_lbfgs

PARAM_NAMES = ("a", "b", "e", "alpha", "beta")


@dataclass
class FitConfig:
    huber_delta: float = 1e-3
    grid_alpha: tuple = (0.0, 0.5, 1.0, 1.5, 2.0)
    grid_beta: tuple = (0.0, 0.5, 1.0, 1.5, 2.0)
    grid_a: tuple = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)
    grid_b: tuple = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)
    grid_e: tuple = (-1.0, -0.5, 0.0, 0.5, 1.0)
    polish_top_k: int = 8             # best batched end points refined with tight tolerances
    # Batched stage tolerances: loose enough to be fast (the polish finishes the job), tight
    # enough that the best basin is reached from many starts (16 on Chinchilla with ftol 1e-5,
    # 462 with 1e-6 at 1.6x the time; the polished optimum is the same to 1e-8).
    # Rows still running after 300 iterations are crawling along degenerate ridges (alpha ~ 40).
    lbfgs: LBFGSConfig = field(default_factory=lambda: LBFGSConfig(ftol=1e-5, patience=2, max_iter=300))
    num_threads: int | None = 1       # torch intra-op threads during the fit (None: leave as is);
                                      # 1 because [4500, n] ops gain nothing from more and OpenMP
                                      # spin-waits badly on a shared, loaded machine

    def grid(self) -> np.ndarray:
        """All starts as rows `[a, b, e, alpha, beta]` (4,500 with the defaults)."""
        return np.array(list(itertools.product(self.grid_a, self.grid_b, self.grid_e,
                                               self.grid_alpha, self.grid_beta)), dtype=np.float64)


@dataclass
class FitResult:
    law: ScalingLaw
    objective: float          # summed Huber loss at the optimum
    n_runs: int
    n_starts: int
    n_converged: int          # starts whose batched L-BFGS stopped on a tolerance
    seconds: float
    x_starts: np.ndarray = field(repr=False, default=None)   # final [S, 5] per start (for warm starts)
    f_starts: np.ndarray = field(repr=False, default=None)

    def best_distinct(self, k: int, tol: float = 1e-3) -> np.ndarray:
        """Up to `k` best end points that differ by more than `tol` (warm starts for bootstrap)."""
        order = np.argsort(self.f_starts)
        kept = [self.law.log_params()]
        for i in order:
            x = self.x_starts[i]
            if not np.all(np.isfinite(x)):
                continue
            if all(np.abs(x - y).max() > tol for y in kept):
                kept.append(x)
            if len(kept) >= k:
                break
        return np.stack(kept)




def _huber_np(r, delta):
    ar = np.abs(r)
    return np.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta)), np.clip(r, -delta, delta)


def make_value_and_grad(logN, logD, logL, delta, weights_SR=None, dtype=torch.float64):
    """Batched objective and analytic gradient: `fg(x_RP, rows_R) -> (f_R, g_RP)`.

    With `t_k` the three LSE terms and `p_k` their softmax, `d pred / d(a, b, e) = p` and
    `d pred / d(alpha, beta) = -(p_0 log N, p_1 log D)`; the Huber derivative is `clip(r, ±delta)`.
    Hand-written because autograd through `logsumexp` doubles the cost of every evaluation.
    """
    logN = torch.as_tensor(logN, dtype=torch.float64)
    logD = torch.as_tensor(logD, dtype=torch.float64)
    logL = torch.as_tensor(logL, dtype=torch.float64)

    M1 = torch.stack([torch.ones_like(logN), -logN], dim=1)     # [n, 2]: d/da, d/dalpha
    M2 = torch.stack([torch.ones_like(logD), -logD], dim=1)     # [n, 2]: d/db, d/dbeta

    def fg(x_RP, rows_R):
        # In-place arithmetic on [R, n] temporaries: this function is the whole cost of the fit.
        x_in = x_RP
        x_RP = x_RP.to(dtype)
        a, b, e, alpha, beta = (x_RP[:, i:i + 1] for i in range(5))
        e1 = torch.addcmul(a, alpha, logN, value=-1.0)           # a - alpha log N
        e2 = torch.addcmul(b, beta, logD, value=-1.0)            # b - beta log D
        tmax = torch.maximum(torch.maximum(e1, e2), e)
        e1.sub_(tmax).exp_()
        e2.sub_(tmax).exp_()
        e3 = torch.sub(e, tmax).exp_()
        s = e1 + e2
        s.add_(e3)
        r = torch.log(s).add_(tmax).sub_(logL)                   # residual in log space
        dh = r.clamp(-delta, delta)                               # Huber derivative
        # Huber(r) = |dh| |r| - dh^2 / 2 (0.5 r^2 inside delta, delta (|r| - delta/2) outside)
        h = r.abs_().mul_(dh.abs()).sub_(dh.square().mul_(0.5))
        if weights_SR is not None:
            w = weights_SR[rows_R]
            h.mul_(w)
            dh.mul_(w)
        q = dh.div_(s)
        g12 = torch.cat([e1.mul_(q) @ M1, e2.mul_(q) @ M2], dim=1)    # [R, 4]: a, alpha, b, beta
        g_RP = torch.stack([g12[:, 0], g12[:, 2], e3.mul_(q).sum(-1), g12[:, 1], g12[:, 3]], dim=-1)
        return h.sum(-1).to(x_in.dtype), g_RP.to(x_in.dtype)

    return fg


def objective_np(x, logN, logD, logL, delta, weights=None):
    """Summed Huber objective and its analytic gradient for one parameter vector (numpy)."""
    a, b, e, alpha, beta = x
    t = np.stack([a - alpha * logN, b - beta * logD, np.full_like(logN, e)])
    tmax = t.max(0)
    ex = np.exp(t - tmax)
    s = ex.sum(0)
    pred = tmax + np.log(s)
    h, dh = _huber_np(pred - logL, delta)
    w = np.ones_like(logN) if weights is None else weights
    p = ex / s                        # softmax weights of the three terms
    gw = w * dh
    grad = np.array([
        (gw * p[0]).sum(), (gw * p[1]).sum(), (gw * p[2]).sum(),
        -(gw * p[0] * logN).sum(), -(gw * p[1] * logD).sum(),
    ])
    return float((w * h).sum()), grad


POLISH = LBFGSConfig(ftol=1e-14, patience=5, gtol=1e-13, max_iter=3000, history=20)


def polish(x_KP, logN, logD, logL, delta, weights_KR=None, config: LBFGSConfig = POLISH):
    """Refine a few end points with tight tolerances, batched; returns `(x_KP, f_K)` (numpy).

    (scipy's L-BFGS-B would do the same per point, but its Fortran-to-C core spends milliseconds
    per call in threaded BLAS on a loaded machine: 100 bootstrap polishes took 45 s.)
    """
    x_KP = np.atleast_2d(np.asarray(x_KP, dtype=np.float64))
    w = None if weights_KR is None else torch.as_tensor(np.atleast_2d(weights_KR).astype(np.float64))
    fg = make_value_and_grad(logN, logD, logL, delta, w)
    res = batched_lbfgs(fg, torch.as_tensor(x_KP), config)
    return res.x_SP.numpy(), res.f_S.numpy()


def fit_scaling_law(N, D, L, config: FitConfig | None = None, starts: np.ndarray | None = None,
                    weights: np.ndarray | None = None) -> FitResult:
    """Fit Eq. 1 to runs with parameters `N`, tokens `D`, final loss `L` (1-D arrays).

    `starts` replaces the grid (rows `[a, b, e, alpha, beta]`); `weights` multiplies each run's
    Huber term (bootstrap counts).
    """
    cfg = config or FitConfig()
    with torch_threads(cfg.num_threads):
        return _fit(N, D, L, cfg, starts, weights)


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run a block with `n` torch intra-op threads, restoring the previous count after."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _fit(N, D, L, cfg: FitConfig, starts, weights) -> FitResult:
    t0 = time.perf_counter()
    N, D, L = (np.asarray(v, dtype=np.float64) for v in (N, D, L))
    if not (N.shape == D.shape == L.shape) or N.ndim != 1:
        raise ValueError("N, D, L must be 1-D arrays of the same length")
    if N.size < 5:
        raise ValueError(f"need at least 5 runs to fit 5 parameters, got {N.size}")
    logN, logD, logL = np.log(N), np.log(D), np.log(L)
    x0 = cfg.grid() if starts is None else np.asarray(starts, dtype=np.float64)
    w_SR = None
    if weights is not None:
        w_SR = torch.as_tensor(np.broadcast_to(weights, (x0.shape[0], N.size)).copy(), dtype=torch.float64)
    fg = make_value_and_grad(logN, logD, logL, cfg.huber_delta, w_SR)
    res = batched_lbfgs(fg, torch.as_tensor(x0), cfg.lbfgs)
    x_S = res.x_SP.numpy()
    f_S = res.f_S.numpy().copy()
    f_S[~np.isfinite(f_S)] = np.inf
    top = np.argsort(f_S)[: max(1, cfg.polish_top_k)]
    w_KR = None if weights is None else np.broadcast_to(weights, (top.size, N.size))
    xp, fp = polish(x_S[top], logN, logD, logL, cfg.huber_delta, w_KR)
    fp = np.where(np.isfinite(fp), fp, np.inf)
    j = int(np.argmin(fp))
    best_x, best_f = (xp[j], fp[j]) if fp[j] <= f_S[top[0]] else (x_S[top[0]], f_S[top[0]])
    law = ScalingLaw.from_log_params(*best_x)
    return FitResult(law=law, objective=float(best_f), n_runs=int(N.size), n_starts=int(x0.shape[0]),
                     n_converged=int(res.converged_S.sum()), seconds=time.perf_counter() - t0,
                     x_starts=x_S, f_starts=f_S)
