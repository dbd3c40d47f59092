"""Every RNG a rank uses (python, numpy, torch, CUDA) as plain tensors and ints, so the state
round-trips through `torch.load(weights_only=True)` without allow-listing numpy."""
from __future__ import annotations

import random

import numpy as np
import torch


def rng_state() -> dict:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    if isinstance(internal, torch.Tensor):
        internal = tuple(int(v) for v in internal.tolist())
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = state["numpy"]
    keys = keys.numpy().astype(np.uint32) if isinstance(keys, torch.Tensor) else keys
    np.random.set_state((kind, keys, *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
