"""How well the fitted law predicts losses: held-in and held-out errors (appendix C.6, Table 10).

Held-in: fit on all runs, score on the same runs. Held-out (extrapolation): fit on the runs with
fewer than `split_params` parameters, predict the larger ones (the paper held out an 8B model).
By default the largest model size in the runs is held out. Metrics: MSE, R², MAE in percent of the
observed loss.

    from pretrain.scaling.validation import extrapolation
    extrapolation(N, D, L).held_out["R2"]
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .fit import FitConfig, fit_scaling_law
from .law import ScalingLaw


def prediction_metrics(observed, predicted) -> dict:
    """MSE, R² and MAE (%) of `predicted` against `observed`."""
    y = np.asarray(observed, dtype=np.float64)
    p = np.asarray(predicted, dtype=np.float64)
    err = p - y
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((err ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan")
    return {"MSE": float((err ** 2).mean()), "R2": r2, "MAE_percent": float((np.abs(err) / y).mean() * 100),
            "n": int(y.size)}


@dataclass
class ExtrapolationResult:
    split_params: float                  # runs with N >= split are held out
    law: ScalingLaw                      # fitted on the smaller models
    held_in: dict = field(default_factory=dict)
    held_out: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["law"] = self.law.to_dict()
        return d


def extrapolation(N, D, L, split_params: float | None = None,
                  config: FitConfig | None = None) -> ExtrapolationResult:
    """Fit on `N < split_params` (default: all but the largest size), score both sides."""
    N, D, L = (np.asarray(v, dtype=np.float64) for v in (N, D, L))
    sizes = np.unique(N)
    if split_params is None:
        if sizes.size < 2:
            raise ValueError("held-out extrapolation needs at least two model sizes")
        split_params = float(sizes[-1])
    train = N < split_params
    if train.sum() < 5 or (~train).sum() == 0:
        raise ValueError(f"split at {split_params:.3g} leaves {train.sum()} runs to fit, "
                         f"{(~train).sum()} to predict")
    law = fit_scaling_law(N[train], D[train], L[train], config).law
    return ExtrapolationResult(
        split_params=float(split_params), law=law,
        held_in=prediction_metrics(L[train], law.predict(N[train], D[train])),
        held_out=prediction_metrics(L[~train], law.predict(N[~train], D[~train])))
