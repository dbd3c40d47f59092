"""Batched L-BFGS: many independent minimisations advanced together, in torch float64.

The scaling-law fit (appendix C.1 of the paper) runs L-BFGS from a grid of 4,500 starts. A
Python loop of `scipy.optimize.minimize` pays the interpreter per start (about 47 s for 240
runs on a 2-core machine); here every start is one row of a `[S, P]` tensor, the objective is
evaluated for all rows at once, and each row keeps its own L-BFGS history, step and
convergence flag. Rows never interact: `value_and_grad(x_RP, rows_R)` returns one objective value
and one gradient per row (`rows_R` says which original rows are being evaluated, so row-specific
data such as bootstrap weights can be gathered). `autograd_value_and_grad` wraps a plain batched
objective `f(x_RP, rows_R) -> f_R` for laws without a hand-written gradient.

Line search: backtracking (Armijo) from a unit step, per row, evaluating only the rows still
searching. Curvature pairs with `s·y <= 1e-12·|s||y|` are skipped, which keeps the inverse
Hessian estimate positive definite without a Wolfe search. Rows stop when the objective's
relative change falls below `ftol` for `patience` iterations in a row, or the gradient's max
norm falls below `gtol`.

    from pretrain.scaling.lbfgs import batched_lbfgs
    fg = autograd_value_and_grad(lambda x, rows: ((x - 3) ** 2).sum(-1))
    res = batched_lbfgs(fg, torch.zeros(10, 2, dtype=torch.float64))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class LBFGSConfig:
    max_iter: int = 1000       # iterations per row (each costs one or more batched evaluations)
    history: int = 10          # curvature pairs kept per row
    ftol: float = 1e-10        # stop when |f_old - f_new| <= ftol * max(|f_old|, |f_new|, tiny)...
    patience: int = 5          # ...for this many consecutive iterations
    gtol: float = 1e-10        # or when max |grad| <= gtol
    max_linesearch: int = 40   # halvings before a row gives up on its current direction
    armijo_c1: float = 1e-4    # sufficient-decrease constant


@dataclass
class LBFGSResult:
    x_SP: torch.Tensor          # final parameters, one row per start
    f_S: torch.Tensor           # final objective per row
    converged_S: torch.Tensor   # bool: stopped by a tolerance (not by max_iter or a failed search)
    iterations: int             # iterations of the batched loop


ValueAndGrad = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def autograd_value_and_grad(objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> ValueAndGrad:
    """Per-row value and gradient of a batched objective `f(x_RP, rows_R) -> f_R` by autograd."""
    def fg(x_RP, rows_R):
        x = x_RP.detach().requires_grad_(True)
        f_R = objective(x, rows_R)
        (g_RP,) = torch.autograd.grad(f_R.sum(), x)
        return f_R.detach(), g_RP.detach()
    return fg


def batched_lbfgs(value_and_grad: ValueAndGrad, x0_SP: torch.Tensor,
                  config: LBFGSConfig | None = None) -> LBFGSResult:
    """Minimise independently for every row of `x0_SP`; only rows still running are evaluated."""
    cfg = config or LBFGSConfig()
    x = x0_SP.detach().clone().to(torch.float64)
    S, P = x.shape
    m = cfg.history
    all_rows = torch.arange(S)

    evaluate = value_and_grad
    f, g = evaluate(x, all_rows)
    # History per row, oldest first: slot m-1 is the newest pair. New pairs shift the row's
    # history left, so the two-loop recursion reads fixed slots (views, no per-slot gathers).
    s_hist = torch.zeros(S, m, P, dtype=torch.float64)
    y_hist = torch.zeros(S, m, P, dtype=torch.float64)
    rho_hist = torch.zeros(S, m, dtype=torch.float64)       # 0 marks an empty slot
    n_pairs = torch.zeros(S, dtype=torch.long)
    active = torch.ones(S, dtype=torch.bool)
    converged = torch.zeros(S, dtype=torch.bool)
    quiet = torch.zeros(S, dtype=torch.long)                 # consecutive small-change iterations
    first = torch.ones(S, dtype=torch.bool)

    it = 0
    for it in range(1, cfg.max_iter + 1):
        rows = all_rows[active]
        if rows.numel() == 0:
            break
        R = rows.numel()
        everyone = R == S          # no gathers while every row is still running
        g_R = g if everyone else g[rows]
        s_R, y_R, rho_R = (s_hist, y_hist, rho_hist) if everyone else (s_hist[rows], y_hist[rows], rho_hist[rows])
        # Two-loop recursion, newest pair first (empty slots have rho = 0 and do nothing).
        q = g_R.clone()
        alphas = torch.zeros(R, m, dtype=torch.float64)
        for k in range(m - 1, -1, -1):
            a_k = rho_R[:, k] * (s_R[:, k] * q).sum(-1)
            q -= a_k[:, None] * y_R[:, k]
            alphas[:, k] = a_k
        s_n, y_n = s_R[:, m - 1], y_R[:, m - 1]
        yy = (y_n * y_n).sum(-1)
        gamma = torch.where((n_pairs[rows] > 0) & (yy > 0), (s_n * y_n).sum(-1) / yy.clamp_min(1e-300),
                            torch.ones(R, dtype=torch.float64))
        r = gamma[:, None] * q
        for k in range(m):
            b_k = rho_R[:, k] * (y_R[:, k] * r).sum(-1)
            r += (alphas[:, k] - b_k)[:, None] * s_R[:, k]
        d = -r
        # Fall back to steepest descent where the direction is not a descent direction.
        gd = (g_R * d).sum(-1)
        bad = ~(gd < 0) | ~torch.isfinite(gd)
        if bad.any():
            d[bad] = -g_R[bad]
            gd = (g_R * d).sum(-1)
            reset = rows[bad]
            rho_hist[reset] = 0
            rho_R[bad] = 0            # the local copy too: the shift below rebuilds from it
            n_pairs[reset] = 0
        # Initial step: 1, except on a row's first iteration (scale the gradient to unit length).
        t = torch.ones(R, dtype=torch.float64)
        fr = first[rows] | bad
        if fr.any():
            t[fr] = 1.0 / d[fr].abs().sum(-1).clamp_min(1e-300)
        f_R = f if everyone else f[rows]
        x_R = x if everyone else x[rows]
        new_x = x_R.clone()
        new_f = f_R.clone()
        new_g = g_R.clone()
        searching = torch.ones(R, dtype=torch.bool)
        found = torch.zeros(R, dtype=torch.bool)
        for _ in range(cfg.max_linesearch):
            sub = searching.nonzero().squeeze(-1)
            if sub.numel() == 0:
                break
            xt = x_R[sub] + t[sub, None] * d[sub]
            ft, gt = evaluate(xt, rows[sub])
            ok = torch.isfinite(ft) & (ft <= f_R[sub] + cfg.armijo_c1 * t[sub] * gd[sub])
            acc = sub[ok]
            new_x[acc], new_f[acc], new_g[acc] = xt[ok], ft[ok], gt[ok]
            found[acc] = True
            searching[acc] = False
            t[sub[~ok]] *= 0.5
        # Rows whose search failed are finished (no further progress possible from here).
        failed = ~found
        s = new_x - x_R
        y = new_g - g_R
        sy = (s * y).sum(-1)
        good = found & (sy > 1e-12 * s.norm(dim=-1) * y.norm(dim=-1))
        if good.any():
            gr = rows[good]
            s_hist[gr] = torch.cat([s_R[good, 1:], s[good, None]], dim=1)
            y_hist[gr] = torch.cat([y_R[good, 1:], y[good, None]], dim=1)
            rho_hist[gr] = torch.cat([rho_R[good, 1:], (1.0 / sy[good])[:, None]], dim=1)
            n_pairs[gr] = (n_pairs[gr] + 1).clamp_max(m)
        change = (f_R - new_f).abs()
        small = change <= cfg.ftol * torch.maximum(torch.maximum(f_R.abs(), new_f.abs()),
                                                     torch.full_like(f_R, 1e-300))
        q_new = torch.where(small & found, quiet[rows] + 1, torch.zeros_like(quiet[rows]))
        quiet[rows] = q_new
        x[rows], f[rows], g[rows] = new_x, new_f, new_g
        first[rows] = False
        gconv = new_g.abs().amax(-1) <= cfg.gtol
        done = (q_new >= cfg.patience) | gconv
        converged[rows[done]] = True
        active[rows[done | failed]] = False
    return LBFGSResult(x_SP=x, f_S=f, converged_S=converged, iterations=it)
