"""Epoch AI's extraction of the Chinchilla runs, the public check of the fitter.

Besiroglu et al. (2024) refit Hoffmann et al.'s approach 3 on
`tests/data/chinchilla_epoch_svg_extracted.csv` after dropping the 5 highest losses (240 runs
left), with `D = C / (6 N)`, and got E 1.8172, A 482.01, B 2085.43, alpha 0.3478, beta 0.3658.

    python tools/fit_scaling_laws.py tests/data/chinchilla_epoch_svg_extracted.csv --chinchilla --out /tmp/chin
"""
from __future__ import annotations

import csv

import numpy as np

EPOCH_REFIT = {"E": 1.8172, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658}


def load_chinchilla(path: str, drop_highest: int = 5) -> list[dict]:
    """Rows `{N, D, C, loss, kind}` from the CSV (columns `Model Size`, `Training FLOP`, `loss`)."""
    with open(path, newline="") as f:
        raw = list(csv.DictReader(f))
    N = np.array([float(r["Model Size"]) for r in raw])
    C = np.array([float(r["Training FLOP"]) for r in raw])
    L = np.array([float(r["loss"]) for r in raw])
    keep = np.sort(np.argsort(L, kind="stable")[: L.size - drop_highest])
    return [{"name": f"chinchilla_{i}", "kind": "chinchilla", "N": N[i], "D": C[i] / (6 * N[i]), "C": C[i],
             "loss": L[i]} for i in keep]
