"""Sparsity-aware scaling law of Abnar et al. (2025), the alternative form of Table 12 (C.7):

    L(N, D, S) = A / N^alpha + B / D^beta + C / (1 - S)^lam + d / ((1 - S)^delta N^gamma) + E

N: active parameters, D: tokens, S: sparsity, the fraction of experts *not* used per token
(`1 - top_k / n_experts`; 0.875 for the paper's 8 experts top-1; 0 for dense runs). Fitted like
Eq. 1 (appendix C.1): summed Huber (delta 1e-3) on
`LSE(a - alpha log N, b - beta log D, c - lam log(1-S), g - delta log(1-S) - gamma log N, e) - log L`
from a grid of starts, all starts at once in the batched L-BFGS (autograd gradients), the best kept.

With a single sparsity level (the paper's case) the S terms are not identifiable apart from E and
the N term: the fit still runs and predicts, but its C, lam, delta are arbitrary. Mix sparsity
levels (dense and MoE runs) to pin them down.

    from pretrain.scaling.sparse import fit_sparse_law
    fit_sparse_law(N, D, S, L).law.predict(N, D, S)
"""
from __future__ import annotations

import itertools
import time
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .fit import POLISH, torch_threads
from .lbfgs import LBFGSConfig, autograd_value_and_grad, batched_lbfgs

# Log-parametrised order used by the fitter.
PARAMS = ("a", "b", "c", "g", "e", "alpha", "beta", "lam", "delta", "gamma")


@dataclass(frozen=True)
class SparseScalingLaw:
    E: float
    A: float
    B: float
    C: float
    d: float
    alpha: float
    beta: float
    lam: float
    delta: float
    gamma: float
    logs: tuple = ()   # (log A, log B, log C, log d, log E) as fitted: exact even where C or d underflow

    @classmethod
    def from_log_params(cls, x) -> "SparseScalingLaw":
        a, b, c, g, e, alpha, beta, lam, delta, gamma = (float(v) for v in x)
        return cls(E=np.exp(e), A=np.exp(a), B=np.exp(b), C=np.exp(c), d=np.exp(g),
                   alpha=alpha, beta=beta, lam=lam, delta=delta, gamma=gamma, logs=(a, b, c, g, e))

    def predict(self, N, D, S):
        """Evaluated as a log-sum-exp of the log terms: fits on a single sparsity level can push
        C to 1e-300 with lam in the thousands, finite together but not as separate numbers."""
        N, D, S = (np.asarray(v, dtype=np.float64) for v in (N, D, S))
        logN, logD, log1mS = np.log(N), np.log(D), np.log1p(-S)
        if self.logs:
            lA, lB, lC, ld, lE = self.logs
        else:
            with np.errstate(divide="ignore"):
                lA, lB, lC, ld, lE = (np.log(v) for v in (self.A, self.B, self.C, self.d, self.E))
        terms = np.stack(np.broadcast_arrays(lA - self.alpha * logN, lB - self.beta * logD, lC - self.lam * log1mS,
                                             ld - self.delta * log1mS - self.gamma * logN, lE + 0 * logN))
        return np.exp(np.logaddexp.reduce(terms, axis=0))

    def to_dict(self) -> dict:
        d = {k: float(v) for k, v in asdict(self).items() if k != "logs"}
        if self.logs:
            d["log_params"] = dict(zip(("log_A", "log_B", "log_C", "log_d", "log_E"), map(float, self.logs)))
        return d


@dataclass
class SparseFitConfig:
    huber_delta: float = 1e-3
    grid: dict = field(default_factory=lambda: {
        "a": (0.0, 5.0, 10.0), "b": (0.0, 5.0, 10.0), "c": (-1.0, 0.0), "g": (0.0, 6.0, 12.0),
        "e": (-1.0, 0.5), "alpha": (0.3, 0.7), "beta": (0.3, 0.6), "lam": (0.2,),
        "delta": (0.2,), "gamma": (0.3, 0.7)})      # 864 starts
    lbfgs: LBFGSConfig = field(default_factory=lambda: LBFGSConfig(ftol=1e-5, patience=2, max_iter=200))
    polish_top_k: int = 8
    num_threads: int | None = 1

    def starts(self) -> np.ndarray:
        return np.array(list(itertools.product(*(self.grid[k] for k in PARAMS))), dtype=np.float64)


@dataclass
class SparseFitResult:
    law: SparseScalingLaw
    objective: float
    n_runs: int
    n_starts: int
    seconds: float


def fit_sparse_law(N, D, S, L, config: SparseFitConfig | None = None) -> SparseFitResult:
    cfg = config or SparseFitConfig()
    t0 = time.perf_counter()
    N, D, S, L = (np.asarray(v, dtype=np.float64) for v in (N, D, S, L))
    if np.unique(S).size < 2:
        warnings.warn("one sparsity level only: C, lam and delta of the sparse law are not identifiable")
    logN = torch.as_tensor(np.log(N))
    logD = torch.as_tensor(np.log(D))
    log1mS = torch.as_tensor(np.log1p(-S))
    logL = torch.as_tensor(np.log(L))
    hd = cfg.huber_delta

    def objective(x, rows):
        a, b, c, g, e, alpha, beta, lam, delta, gamma = (x[:, i:i + 1] for i in range(10))
        terms = torch.stack([a - alpha * logN, b - beta * logD, c - lam * log1mS,
                             g - delta * log1mS - gamma * logN, e.expand(-1, logN.numel())])
        r = torch.logsumexp(terms, 0) - logL
        ar = r.abs()
        return torch.where(ar <= hd, 0.5 * r * r, hd * (ar - 0.5 * hd)).sum(-1)

    x0 = torch.as_tensor(cfg.starts())
    fg = autograd_value_and_grad(objective)
    with torch_threads(cfg.num_threads):
        res = batched_lbfgs(fg, x0, cfg.lbfgs)
        f = res.f_S.numpy().copy()
        f[~np.isfinite(f)] = np.inf
        top = np.argsort(f)[: cfg.polish_top_k]
        pol = batched_lbfgs(fg, res.x_SP[top], POLISH)
    fp = pol.f_S.numpy()
    i = int(np.argmin(np.where(np.isfinite(fp), fp, np.inf)))
    x_best, f_best = (pol.x_SP[i].numpy(), fp[i]) if fp[i] <= f[top[0]] else (res.x_SP[top[0]].numpy(), f[top[0]])
    law = SparseScalingLaw.from_log_params(x_best)
    if not np.all(np.isfinite([law.A, law.B, law.C, law.d, law.E])) or min(law.C, law.d, law.E) == 0.0:
        warnings.warn("sparse law: some coefficients over- or underflow (terms not identifiable from these runs)")
    return SparseFitResult(law=law, objective=float(f_best),
                           n_runs=int(N.size), n_starts=int(x0.shape[0]), seconds=time.perf_counter() - t0)


def sparsity(n_experts: int, top_k: int) -> float:
    """S = 1 - top_k / n_experts (0 for dense)."""
    return 0.0 if n_experts <= 1 else 1.0 - top_k / n_experts
