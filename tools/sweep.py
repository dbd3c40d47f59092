#!/usr/bin/env python
"""Write a scaling-law sweep: per run an overrides YAML, a launch command, and a manifest.

    python tools/sweep.py --kind early --presets 275m,468m --tokens 2.5e9,5e9 --out runs/sweep_early
    python tools/sweep.py --kind moe --presets 275m --flops 1e19,3e19 --out runs/sweep_moe
    python tools/sweep.py --kind early --widths 64,128 --tokens 40960,81920 --base-config pretrain/configs/demo.yaml \\
        --global-batch-size 4 --seq-len 256 --set train.micro_batch_size=2 --set train.eval_every=10 --out runs/demo_sweep
    bash runs/sweep_early/commands.sh      # launches the runs one after another

Learning rates, warm-up and cool-down follow the paper (see `pretrain.scaling.sweep`).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pretrain.scaling.presets import PAPER_BATCH_SIZE, PAPER_SEQ_LEN, preset_names  # noqa: E402
from pretrain.scaling.sweep import SweepConfig, parse_amount, plan_sweep, write_sweep  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", required=True, choices=["early", "late", "moe"])
    ap.add_argument("--presets", help="comma list, e.g. 275m,468m (default: all six of the kind)")
    ap.add_argument("--tokens", help="comma list of token budgets D, e.g. 2.5e9,5e9 or 2.5B,5B")
    ap.add_argument("--flops", help="comma list of FLOP budgets C (D = C / 6N per preset)")
    ap.add_argument("--out", required=True, help="sweep directory (manifest, commands.sh, overrides/)")
    ap.add_argument("--base-config", help="YAML used for every run instead of the preset files")
    ap.add_argument("--config-dir", default="pretrain/configs/paper")
    ap.add_argument("--runs-root", default="runs", help="run dirs: RUNS_ROOT/<sweep name>/<run>")
    ap.add_argument("--name", help="sweep name (default: basename of --out)")
    ap.add_argument("--global-batch-size", type=int, default=PAPER_BATCH_SIZE)
    ap.add_argument("--seq-len", type=int, default=PAPER_SEQ_LEN)
    ap.add_argument("--cooldown-fraction", type=float, default=0.2)
    ap.add_argument("--widths", help="with --base-config: comma list of model.width values (demo sweeps)")
    ap.add_argument("--params", help="with --widths: comma list of parameter counts (for --flops)")
    ap.add_argument("--lr", type=float, help="override the presets' learning rates")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra dotted override for every run (repeatable)")
    args = ap.parse_args(argv)

    presets = [p.strip() for p in args.presets.split(",")] if args.presets else preset_names(args.kind)
    if args.widths and args.presets:
        ap.error("give --presets or --widths, not both")
    cfg = SweepConfig(kind=args.kind, presets=presets,
                      tokens=[parse_amount(t) for t in args.tokens.split(",")] if args.tokens else [],
                      flops=[parse_amount(c) for c in args.flops.split(",")] if args.flops else [],
                      global_batch_size=args.global_batch_size, seq_len=args.seq_len,
                      cooldown_fraction=args.cooldown_fraction, config_dir=args.config_dir,
                      base_config=args.base_config, runs_root=args.runs_root,
                      widths=[int(w) for w in args.widths.split(",")] if args.widths else [],
                      params=[parse_amount(n) for n in args.params.split(",")] if args.params else [],
                      name=args.name or os.path.basename(os.path.normpath(args.out)), lr=args.lr, extra=args.set)
    runs = plan_sweep(cfg)
    paths = write_sweep(runs, args.out)
    missing = sorted({r.config for r in runs if not os.path.exists(r.config)})
    for m in missing:
        print(f"warning: config {m} does not exist (yet)", file=sys.stderr)
    for r in runs:
        print(f"{r.name}: N={r.N:.3g} D={r.D:.3g} C={r.C:.3g} steps={r.steps} warmup={r.warmup_steps} lr={r.lr:g}")
        if r.warmup_note.startswith("deviation"):
            print(f"warning: {r.name}: warm-up {r.warmup_steps} ({r.warmup_note})", file=sys.stderr)
    print(f"{len(runs)} runs -> {paths['commands']}, {paths['manifest_csv']}")


if __name__ == "__main__":
    main()
