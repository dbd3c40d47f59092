"""`L ∝ C^c` on the lower convex hull of the runs (appendix C.3, Figures 2, 9, 26).

The frontier is the lower convex hull of the points (log C, log L), i.e. the lowest loss any
interpolation between runs reaches at each budget, cut at its lowest point so that it never
rises. As in the paper, budgets at or below a threshold (3e19 FLOPs) are excluded, the hull is
sampled at linearly spaced C above it, and a line is fitted in log space: `L = K C^c`
(paper: early fusion c = -0.049, K = 29.574; MoE c = -0.048, K = 27.086). When no run exceeds
the threshold (demo-sized sweeps) the whole hull is used and `threshold_used` says so.
Linear spacing (the paper's) puts almost every sample in the top decade of compute, so c is in
effect the slope of the last hull segments; `spacing="log"` weights every decade equally.

    from pretrain.scaling.hull import fit_hull_exponent
    fit_hull_exponent(C, L).c
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field

import numpy as np

DEFAULT_MIN_FLOPS = 3e19


@dataclass
class HullFit:
    c: float                     # exponent of L = K C^c
    K: float                     # multiplicative constant
    hull_C: list = field(default_factory=list)   # frontier vertices, increasing C
    hull_L: list = field(default_factory=list)
    C_min: float = 0.0           # range of budgets sampled for the fit
    C_max: float = 0.0
    threshold_used: bool = True  # False when the threshold would have left nothing to fit

    def predict(self, C):
        return self.K * np.asarray(C, dtype=np.float64) ** self.c

    def to_dict(self) -> dict:
        return asdict(self)


def lower_hull(x, y):
    """Indices of the lower convex hull of points (x, y), by increasing x (monotone chain)."""
    order = np.lexsort((y, x))
    hull: list[int] = []
    for i in order:
        if hull and x[hull[-1]] == x[i]:
            continue        # same x, higher or equal y: not on the lower hull
        while len(hull) >= 2:
            o, a = hull[-2], hull[-1]
            cross = (x[a] - x[o]) * (y[i] - y[o]) - (y[a] - y[o]) * (x[i] - x[o])
            if cross <= 0:   # a lies on or above segment o -> i
                hull.pop()
            else:
                break
        hull.append(int(i))
    return np.array(hull, dtype=int)


def frontier(C, L):
    """Vertices `(C, L)` of the non-increasing lower convex frontier."""
    C = np.asarray(C, dtype=np.float64)
    L = np.asarray(L, dtype=np.float64)
    x, y = np.log(C), np.log(L)
    idx = lower_hull(x, y)
    stop = int(np.argmin(y[idx]))       # cut where the hull starts to rise
    idx = idx[: stop + 1]
    return C[idx], L[idx]


def fit_hull_exponent(C, L, min_flops: float = DEFAULT_MIN_FLOPS, n_samples: int = 1000,
                      spacing: str = "linear") -> HullFit:
    """Fit `L = K C^c` to the frontier sampled at `n_samples` budgets above `min_flops`."""
    hC, hL = frontier(C, L)
    if hC.size < 2:
        raise ValueError("the frontier needs at least two distinct budgets")
    lo, hi = hC[0], hC[-1]
    used = True
    if hi <= min_flops:
        warnings.warn(f"no frontier point above {min_flops:.3g} FLOPs; fitting the whole frontier")
        used = False
    else:
        lo = max(lo, min_flops * (1 + 1e-12))
    Cs = np.linspace(lo, hi, n_samples) if spacing == "linear" else np.geomspace(lo, hi, n_samples)
    logL = np.interp(np.log(Cs), np.log(hC), np.log(hL))
    c, logK = np.polyfit(np.log(Cs), logL, 1)
    return HullFit(c=float(c), K=float(np.exp(logK)), hull_C=hC.tolist(), hull_L=hL.tolist(),
                   C_min=float(lo), C_max=float(hi), threshold_used=used)
