"""Scaling-law toolkit: the analysis of Shukor et al. (2025), sections 2.2, 3.1, 4.2, appendix C.

One idea per module:

| module        | what                                                                       |
|---------------|----------------------------------------------------------------------------|
| `law`         | `ScalingLaw`: L = E + A/N^alpha + B/D^beta                                 |
| `lbfgs`       | batched L-BFGS in torch: thousands of independent starts at once           |
| `fit`         | the appendix C.1 fit: summed Huber (1e-3) on LSE residuals, 4,500 starts   |
| `derived`     | N_opt ∝ C^a, D_opt ∝ C^b, D_opt ∝ N^d: closed form and regression (C.2)   |
| `hull`        | L ∝ C^c on the lower convex hull above 3e19 FLOPs (C.3)                    |
| `bootstrap`   | resampled fits, mean and std of every coefficient (C.6, Table 11)          |
| `validation`  | held-in / held-out prediction errors (C.6, Table 10)                       |
| `sparse`      | the sparsity-aware law of Abnar et al. (C.7, Table 12)                     |
| `presets`     | the paper's presets (Table 6) as numbers                                   |
| `sweep`       | sweep generation: steps, learning rates, warm-up, launch commands          |
| `runs`        | collecting finished run directories into RUNS.csv                          |
| `analysis`    | everything above per model kind and loss target                            |
| `plots`       | Figures 1 (bottom), 2 and 23 as PNG                                        |
| `report`      | fit.json and report.md                                                     |
| `chinchilla`  | Epoch AI's Chinchilla data, the fitter's public check                      |
| `specialization` | MoE expert specialisation per layer (§4.4, Figures 12 and 13)           |

Command lines (thin wrappers): `tools/sweep.py`, `tools/collect_runs.py`,
`tools/fit_scaling_laws.py`, `tools/expert_specialization.py`. Tests: `tests/test_scaling_*.py`.

    python tools/sweep.py --kind early --presets 275m,468m --tokens 2.5e9,5e9 --out runs/sweep_early
    bash runs/sweep_early/commands.sh
    python tools/collect_runs.py runs/sweep_early --out runs/sweep_early/RUNS.csv
    python tools/fit_scaling_laws.py runs/sweep_early/RUNS.csv --out runs/sweep_early/fit
"""
from .fit import FitConfig, FitResult, fit_scaling_law
from .law import ScalingLaw

__all__ = ["FitConfig", "FitResult", "ScalingLaw", "fit_scaling_law"]
