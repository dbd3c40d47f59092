#!/usr/bin/env python
"""Fit the paper's scaling laws to a table of finished runs and write fit.json, report.md, plots.

    python tools/fit_scaling_laws.py RUNS.csv --out DIR [--targets avg,caption] [--kinds early,late]
        [--bootstrap 100] [--min-flops 3e19] [--holdout-params 3e9 | --no-holdout] [--sparse]
    # Chinchilla check (Epoch AI's refit: E 1.8172, alpha 0.3478, beta 0.3658):
    python tools/fit_scaling_laws.py tests/data/chinchilla_epoch_svg_extracted.csv --chinchilla --out /tmp/chin

RUNS.csv needs `N`, `D`, `loss`; optional `C`, `kind`, `N_v`, `D_v`, `S`, `loss_<source>`
(written by tools/collect_runs.py). All logic lives in `pretrain.scaling`.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pretrain.scaling.analysis import AnalysisConfig, analyse  # noqa: E402
from pretrain.scaling.chinchilla import load_chinchilla  # noqa: E402
from pretrain.scaling.report import write_outputs  # noqa: E402
from pretrain.scaling.runs import read_runs_csv  # noqa: E402


def _list(text):
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs_csv")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--targets", help="comma list: avg, caption, interleaved, text, ... (default: all present)")
    ap.add_argument("--kinds", help="comma list of model kinds to fit (default: all in the table)")
    ap.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples (0: off)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-flops", type=float, default=3e19, help="hull threshold: budgets <= this are excluded")
    ap.add_argument("--hull-spacing", choices=["linear", "log"], default="linear",
                    help="how budgets are sampled on the hull for L = K C^c (paper: linear)")
    ap.add_argument("--holdout-params", type=float, help="hold out runs with N >= this (default: the largest size)")
    ap.add_argument("--no-holdout", action="store_true", help="skip the held-out extrapolation")
    ap.add_argument("--sparse", action="store_true", help="also fit the sparsity-aware law (Table 12)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--chinchilla", action="store_true",
                    help="input is Epoch AI's Chinchilla CSV: drop the 5 highest losses, D = C / 6N")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    rows = load_chinchilla(args.runs_csv) if args.chinchilla else read_runs_csv(args.runs_csv)
    print(f"{len(rows)} runs from {args.runs_csv}", file=sys.stderr)
    cfg = AnalysisConfig(targets=_list(args.targets), kinds=_list(args.kinds), bootstrap=args.bootstrap,
                         seed=args.seed, min_flops=args.min_flops, hull_spacing=args.hull_spacing, holdout=not args.no_holdout,
                         holdout_params=args.holdout_params, sparse=args.sparse)
    analysis = analyse(rows, cfg)
    paths = write_outputs(analysis, args.out, plots=not args.no_plots)
    p = analysis.primary()
    c = p.coefficients()
    print(f"{p.kind}/{p.target}: E={c['E']:.4f} A={c['A']:.2f} B={c['B']:.2f} alpha={c['alpha']:.4f} "
          f"beta={c['beta']:.4f} a={c['a']:.4f} b={c['b']:.4f} d={c['d']:.4f} "
          f"c={'n/a' if c['c'] is None else format(c['c'], '.4f')} (fit {p.fit['seconds']:.2f} s)")
    for r in analysis.results:
        for w in r.warnings:
            print(f"WARNING {r.kind}/{r.target}: {w}", file=sys.stderr)
    print(f"wrote {paths['fit_json']}, {paths['report']}, {len(paths['plots'])} plots "
          f"in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
