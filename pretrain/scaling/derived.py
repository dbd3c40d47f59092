"""Compute-optimal laws derived from Eq. 1 (appendix C.2): `N_opt ∝ C^a`, `D_opt ∝ C^b`,
`D_opt ∝ N_opt^d`, `N_opt ∝ D_opt^n`, `D_opt/N_opt ∝ C^dn`.

Two routes, as in Table 9 of the paper:

* closed form (Hoffmann et al., 2022, for `C = 6ND`): minimising Eq. 1 under the constraint gives
  `N_opt = G (C/6)^a`, `D_opt = G^-1 (C/6)^b` with `a = beta/(alpha+beta)`,
  `b = alpha/(alpha+beta)`, `G = (alpha A / (beta B))^(1/(alpha+beta))`; hence `d = b/a = alpha/beta`,
  `n = 1/d`, `dn = b - a` (the text's `N/D ∝ C^0.053` is `-dn`).
* regression: for each compute budget C, scan token counts D, set N from the FLOP identity,
  evaluate Eq. 1 and keep the D with the lowest loss; then regress `log N_opt`, `log D_opt` on
  `log C` (and on each other). This is the only route for late fusion, where
  `C = 6 (N D + N_v D_v)`: there `N_v` is regressed linearly on `N` over the runs
  (`N_v = p N + q`), `D_v = rho D` with `rho` the runs' median `D_v / D` (0.544 for the paper's
  45-45-10 mixture), so that `N = (C / (6 D) - rho q) / (1 + rho p)`.

The paper scans D linearly from 10B to 600B; the default here is a dense log-spaced scan around
the runs' token counts (with a parabolic refinement of the minimum), which tracks the closed form
without edge effects when the optimum falls outside 10B-600B. Pass `d_grid=(1e10, 6e11, n, "linear")`
for the paper's exact scan.

    from pretrain.scaling.derived import closed_form
    closed_form(alpha=0.301, beta=0.335)      # a, b, d, n, dn of Table 9
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .law import ScalingLaw


@dataclass
class DerivedExponents:
    a: float            # N_opt ∝ C^a
    b: float            # D_opt ∝ C^b
    d: float            # D_opt ∝ N_opt^d
    n: float            # N_opt ∝ D_opt^n
    dn: float           # D_opt / N_opt ∝ C^dn (Table 9's column; N/D ∝ C^-dn)
    K_a: float | None = None   # N_opt = K_a C^a (None where undefined)
    K_b: float | None = None   # D_opt = K_b C^b

    def to_dict(self) -> dict:
        return asdict(self)


def closed_form(alpha: float, beta: float, A: float | None = None, B: float | None = None) -> DerivedExponents:
    """Exponents (and constants when A, B are given) of the compute-optimal frontier, C = 6ND."""
    a = beta / (alpha + beta)
    b = alpha / (alpha + beta)
    K_a = K_b = None
    if A is not None and B is not None:
        G = (alpha * A / (beta * B)) ** (1.0 / (alpha + beta))
        K_a = G * 6.0 ** -a
        K_b = 6.0 ** -b / G
    return DerivedExponents(a=a, b=b, d=alpha / beta, n=beta / alpha, dn=b - a, K_a=K_a, K_b=K_b)


def optimal_allocation(law: ScalingLaw, C: float):
    """Closed-form `(N_opt, D_opt)` for a FLOP budget `C = 6ND` (arrays allowed)."""
    ex = closed_form(law.alpha, law.beta, law.A, law.B)
    C = np.asarray(C, dtype=np.float64)
    return ex.K_a * C ** ex.a, ex.K_b * C ** ex.b


@dataclass
class LateFusionFlops:
    """`N_v = p N + q` and `D_v = rho D`, so that `C = 6 (N D + N_v D_v)` is a function of (N, D)."""
    p: float
    q: float
    rho: float

    @classmethod
    def from_runs(cls, N, N_v, D, D_v) -> "LateFusionFlops":
        N, N_v, D, D_v = (np.asarray(v, dtype=np.float64) for v in (N, N_v, D, D_v))
        if np.unique(N).size >= 2:
            p, q = np.polyfit(N, N_v, 1)
        else:
            p, q = float(np.mean(N_v / N)), 0.0
        return cls(p=float(p), q=float(q), rho=float(np.median(D_v / D)))

    def params_for(self, C, D):
        """Decoder parameters N that spend C FLOPs on D tokens (may be <= 0: infeasible)."""
        return (C / (6.0 * D) - self.rho * self.q) / (1.0 + self.rho * self.p)


def _loglog_fit(x, y):
    slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
    return float(slope), float(np.exp(intercept))


def optimal_by_scan(law: ScalingLaw, C_values, d_grid=None, late: LateFusionFlops | None = None):
    """`(N_opt, D_opt)` per budget in `C_values` by scanning D (see the module docstring).

    `d_grid`: `(lo, hi, n, "log" | "linear")`; default log-spaced over 1e-4 .. 1e4 times the
    closed-form optimum range, 4,000 points.
    """
    C_values = np.asarray(C_values, dtype=np.float64)
    if d_grid is None:
        _, D_cf = optimal_allocation(law, C_values)
        d_grid = (D_cf.min() * 1e-4, D_cf.max() * 1e4, 4000, "log")
    lo, hi, n, spacing = d_grid
    D = np.geomspace(lo, hi, int(n)) if spacing == "log" else np.linspace(lo, hi, int(n))
    C = C_values[:, None]
    N = late.params_for(C, D[None, :]) if late is not None else C / (6.0 * D[None, :])
    with np.errstate(invalid="ignore", divide="ignore"):
        loss = np.where(N > 0, law.predict(np.where(N > 0, N, 1.0), D[None, :]), np.inf)
    j = np.argmin(loss, axis=1)
    logD = np.log(D)
    D_opt = D[j].copy()
    # Parabolic refinement in log D through the minimum and its neighbours (log grid only).
    if spacing == "log":
        inner = (j > 0) & (j < D.size - 1)
        rows = np.nonzero(inner)[0]
        jj = j[rows]
        y0, y1, y2 = loss[rows, jj - 1], loss[rows, jj], loss[rows, jj + 1]
        h = logD[1] - logD[0]
        den = y0 - 2 * y1 + y2
        off = np.where(den > 0, 0.5 * h * (y0 - y2) / np.where(den > 0, den, 1.0), 0.0)
        D_opt[rows] = np.exp(logD[jj] + np.clip(off, -h, h))
    N_opt = late.params_for(C_values, D_opt) if late is not None else C_values / (6.0 * D_opt)
    at_edge = (j == 0) | (j == D.size - 1)
    return N_opt, D_opt, at_edge


def regression(law: ScalingLaw, C_values, d_grid=None, late: LateFusionFlops | None = None) -> DerivedExponents:
    """Exponents by regression over the scanned optima (appendix C.2, Figure 22)."""
    C_values = np.unique(np.asarray(C_values, dtype=np.float64))
    if C_values.size < 2 or C_values.max() / C_values.min() < 1.5:
        # One budget gives no slope: regress over a decade either side instead.
        mid = float(np.exp(np.log(C_values).mean()))
        C_values = np.geomspace(mid / 10, mid * 10, 21)
    N_opt, D_opt, at_edge = optimal_by_scan(law, C_values, d_grid, late)
    ok = (~at_edge) & (N_opt > 0)
    if ok.sum() < 2:
        ok = N_opt > 0
    C, N_opt, D_opt = C_values[ok], N_opt[ok], D_opt[ok]
    a, K_a = _loglog_fit(C, N_opt)
    b, K_b = _loglog_fit(C, D_opt)
    d, _ = _loglog_fit(N_opt, D_opt)
    n, _ = _loglog_fit(D_opt, N_opt)
    dn, _ = _loglog_fit(C, D_opt / N_opt)
    return DerivedExponents(a=a, b=b, d=d, n=n, dn=dn, K_a=K_a, K_b=K_b)
