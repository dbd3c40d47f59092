"""Learning-rate schedule: linear warm-up, constant, then a `1 - sqrt` cool-down to zero.

The cool-down (Hägele et al., 2024) covers the last `cooldown_fraction` of the steps:
    lr(s) = peak * (1 - sqrt((s - s0) / (S - s0)))   for s0 = S * (1 - cooldown_fraction) <= s < S
so the constant phase can be branched off and cooled at any length, as the paper's sweeps do.
"""
from __future__ import annotations

import math


def lr_multiplier(step: int, max_steps: int, warmup_steps: int, cooldown_fraction: float) -> float:
    """Multiplier of the peak learning rate for the update made at optimizer step `step` (0-based)."""
    cooldown_start = max_steps - int(round(cooldown_fraction * max_steps))
    if warmup_steps > 0 and step < warmup_steps:
        mult = (step + 1) / warmup_steps
    else:
        mult = 1.0
    if step >= cooldown_start and max_steps > cooldown_start:
        progress = (step - cooldown_start) / (max_steps - cooldown_start)
        mult = min(mult, 1.0 - math.sqrt(min(progress, 1.0)))
    return max(mult, 0.0)
