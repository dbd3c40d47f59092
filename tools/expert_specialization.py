#!/usr/bin/env python
"""Expert specialisation of an MoE checkpoint (Shukor et al. 2025, §4.4, Figures 12 and 13).

    python tools/expert_specialization.py --checkpoint runs/demo_moe --data data/demo --out runs/demo_moe/spec
    python tools/expert_specialization.py --checkpoint runs/demo_moe/checkpoints/step_00000300 \\
        --data data/demo --batches 16 --sources caption,interleaved --out /tmp/spec

--checkpoint is a run directory (its newest complete checkpoint and its config.yaml are used) or
one checkpoint tag directory (RUN/checkpoints/step_XXXXXXXX; config.yaml is read from RUN, or
give --config). Held-out ('val') batches of each source are run through the plain model with
every expert (the DeepSpeed checkpoint is merged at any expert-parallel size). Writes
OUT/specialization.json (token counts per layer, expert and modality; image shares; the score
per layer), OUT/expert_image_share.png (Figure 13) and OUT/specialization_score.png (Figure 12).
All logic, and the reading of the paper's score, is in `pretrain.scaling.specialization`.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pretrain.scaling.specialization import analyse_checkpoint, summary_lines, write_outputs  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="run directory or checkpoint tag directory")
    ap.add_argument("--data", help="data root with the held-out shards (default: the run's data.root)")
    ap.add_argument("--config", help="config YAML (default: RUN_DIR/config.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. model.moe.backend=torch (repeatable)")
    ap.add_argument("--batches", type=int, help="micro-batches per source (default: the run's train.eval_batches)")
    ap.add_argument("--micro-batch-size", type=int, help="rows per batch (default: the run's train.micro_batch_size)")
    ap.add_argument("--sources", help="comma list of sources (default: all the run's sources with a val split)")
    ap.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when available)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], help="model weights dtype (default: as built, fp32)")
    ap.add_argument("--include-padding", action="store_true", help="count padding positions as text")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--out", required=True, help="output directory")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    sources = [s.strip() for s in args.sources.split(",") if s.strip()] if args.sources else None
    result = analyse_checkpoint(args.checkpoint, data_root=args.data, config=args.config, overrides=args.set,
                                sources=sources, batches=args.batches, micro_batch_size=args.micro_batch_size,
                                device=args.device, dtype=args.dtype, include_padding=args.include_padding)
    paths = write_outputs(result, args.out, plots=not args.no_plots)
    print(f"checkpoint {result.meta['checkpoint']} (step {result.meta['step']})")
    print("\n".join(summary_lines(result)))
    print(f"wrote {', '.join(paths.values())} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
