"""The parametric loss law of the paper, Eq. 1: `L(N, D) = E + A / N^alpha + B / D^beta`.

N is the number of (active) parameters, D the number of training tokens. The fit works in the
log-parametrisation of Hoffmann et al. (2022): `a = log A`, `b = log B`, `e = log E`, so that
`log L = LSE(a - alpha log N, b - beta log D, e)`.

    from pretrain.scaling.law import ScalingLaw
    law = ScalingLaw(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658)
    law.predict(70e9, 1.4e12)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class ScalingLaw:
    E: float       # irreducible loss
    A: float       # parameter-term coefficient
    B: float       # data-term coefficient
    alpha: float   # parameter exponent
    beta: float    # data exponent

    @classmethod
    def from_log_params(cls, a: float, b: float, e: float, alpha: float, beta: float) -> "ScalingLaw":
        """From the fit's parametrisation `(a, b, e, alpha, beta)`, A = exp(a) etc."""
        return cls(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=float(alpha), beta=float(beta))

    def log_params(self) -> np.ndarray:
        """`[a, b, e, alpha, beta]`, the order the fitter uses.

        A coefficient that underflowed to 0 in `exp` (a fit that drove a term away: few or
        degenerate runs) maps back to the smallest float's log instead of a domain error."""
        def safe_log(x: float) -> float:
            return math.log(max(x, np.finfo(np.float64).tiny))
        return np.array([safe_log(self.A), safe_log(self.B), safe_log(self.E), self.alpha, self.beta])

    def predict(self, N, D):
        """Loss for parameters `N` and tokens `D` (scalars or arrays)."""
        N = np.asarray(N, dtype=np.float64)
        D = np.asarray(D, dtype=np.float64)
        return self.E + self.A / N ** self.alpha + self.B / D ** self.beta

    def to_dict(self) -> dict:
        return asdict(self)
