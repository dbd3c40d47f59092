"""Parameter counts and FLOPs of a run config, analytic (no model is built, so 3B presets are instant).

    python tools/model_stats.py pretrain/configs/paper/early_275m.yaml --json
    python tools/model_stats.py pretrain/configs/paper/late_1b.yaml model.vision.width=1024
    python tools/model_stats.py pretrain/configs/paper/*.yaml          # one table row per config

Keys (pretrain/accounting.py defines each): params, active_params (MoE: top_k experts + router),
decoder_params (N of C = 6ND), vision_params (N_v), embedding_params, non_embedding_params,
flops_per_token (model FLOPs for MFU, attention included, at --image-fraction image tokens),
paper_flops_per_token (6N, or 6(N + N_v * image fraction) for late fusion).
`--build` also instantiates the model and checks the analytic counts against it (small configs).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pretrain.accounting import PAPER_IMAGE_FRACTION, count_model_params, model_stats, param_counts  # noqa: E402
from pretrain.config import ConfigError, load_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("configs", nargs="+", help="YAML recipe(s), then optional section.key=value overrides")
    p.add_argument("--json", action="store_true", help="print JSON (one object, or a list for several configs)")
    p.add_argument("--image-fraction", type=float, default=PAPER_IMAGE_FRACTION,
                   help="share of decoder tokens that are image patches (default: the paper's 45-45-10 "
                        f"mixture, {PAPER_IMAGE_FRACTION})")
    p.add_argument("--attention", choices=("full", "causal"), default="full",
                   help="attention context in flops_per_token: full T (PaLM convention) or causal mean")
    p.add_argument("--build", action="store_true", help="also build the model and check the counts")
    args = p.parse_args(argv)
    paths = [a for a in args.configs if "=" not in a]
    overrides = [a for a in args.configs if "=" in a]

    rows = []
    for path in paths:
        try:
            cfg = load_config(path, overrides)
        except ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
            return 2
        stats = {"config": path, **model_stats(cfg.model, cfg.data.seq_len, args.image_fraction, args.attention)}
        if args.build:
            from pretrain.models import build_model
            built = count_model_params(build_model(cfg.model)).as_dict()
            stats["built_matches"] = built == param_counts(cfg.model).as_dict()
        rows.append(stats)

    if args.json:
        print(json.dumps(rows[0] if len(rows) == 1 else rows, indent=2))
        return 0
    print(f"{'config':<44} {'kind':<6} {'params':>10} {'active':>10} {'vision':>9} {'embed':>9} "
          f"{'GFLOP/token':>11}")
    for r in rows:
        print(f"{r['config']:<44} {r['kind']:<6} {r['params'] / 1e6:>9.1f}M {r['active_params'] / 1e6:>9.1f}M "
              f"{r['vision_params'] / 1e6:>8.1f}M {r['embedding_params'] / 1e6:>8.1f}M "
              f"{r['flops_per_token'] / 1e9:>11.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
