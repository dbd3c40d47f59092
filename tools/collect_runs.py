#!/usr/bin/env python
"""Collect the final evaluation losses and N, D, C of finished runs into a CSV for the fit.

    python tools/collect_runs.py runs/sweep_early/* --out runs/sweep_early/RUNS.csv
    python tools/collect_runs.py runs/sweep_early --out RUNS.csv     # finds the runs below

Unfinished runs (no finished summary.json) are skipped with a warning. Columns: see
`pretrain.scaling.runs`.
"""
import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pretrain.scaling.runs import collect_runs, write_runs_csv  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="+")
    ap.add_argument("--out", required=True, help="CSV path")
    args = ap.parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = collect_runs(args.run_dirs)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    if not rows:
        sys.exit("no finished runs found")
    write_runs_csv(rows, args.out)
    print(f"{len(rows)} finished runs -> {args.out}")


if __name__ == "__main__":
    main()
