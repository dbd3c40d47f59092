"""Generate the demo data set (coloured shapes, captions, interleaved docs, prose) from nothing.

    python tools/make_demo_data.py --out data/demo [--seed 0]

Writes the tokenizer, webdataset shards and manifest.json under --out; logic in pretrain/data/corpora/demo.py.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pretrain.data.corpora.demo import DemoSizes, make_demo_data  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/demo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=512)
    ap.add_argument("--captions", type=int, default=DemoSizes.caption)
    ap.add_argument("--interleaved", type=int, default=DemoSizes.interleaved)
    ap.add_argument("--text", type=int, default=DemoSizes.text)
    ap.add_argument("--val-fraction", type=float, default=DemoSizes.val_fraction)
    a = ap.parse_args()
    sizes = DemoSizes(caption=a.captions, interleaved=a.interleaved, text=a.text, val_fraction=a.val_fraction)
    make_demo_data(a.out, seed=a.seed, sizes=sizes, vocab_size=a.vocab_size)


if __name__ == "__main__":
    main()
