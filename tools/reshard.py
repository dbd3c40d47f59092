"""Rewrite a shard set (ingest output or packed rows) into N shards per (source, split),
balanced by tokens, so every rank and data worker gets the same work.

    python tools/reshard.py --input data/demo --output data/demo_8 --num-shards 8 [--workers 2]

Documents weigh text tokens + images x --image-tokens + 2; packed rows weigh seq_len each.
The output manifest's `balance` gives, per source and split, the largest and smallest shard in
tokens and their relative difference. Re-running skips completed shards; an unreadable input
shard is reported, counted in the manifest's `errors` and skipped. Logic: pretrain/data/offline/reshard.py.
"""
import argparse
import json
import os
import sys
from dataclasses import asdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pretrain.data.offline.reshard import reshard  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, help="directory holding manifest.json")
    ap.add_argument("--output", required=True)
    ap.add_argument("--num-shards", type=int, required=True, help="output shards per (source, split)")
    ap.add_argument("--image-tokens", type=int, default=258,
                    help="tokens an image occupies in a row (n_patches + 2; 258 at 224 px / 14 px patches)")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args()
    try:
        r = reshard(a.input, a.output, a.num_shards, image_tokens=a.image_tokens, workers=a.workers,
                    progress=not a.no_progress)
    except ValueError as e:
        print(f"reshard: {e}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(r), indent=1))
    for group, b in r.balance.items():
        print(f"{group:20s} {b['shards']:4d} shards  max {b['max_tokens']:10d}  min {b['min_tokens']:10d}  "
              f"imbalance {100 * b['imbalance']:.3f}%")
    return 1 if r.shards_failed else 0


if __name__ == "__main__":
    sys.exit(main())
