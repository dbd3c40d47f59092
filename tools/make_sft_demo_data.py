"""Write the demo's instruction data (LLaVA format) and held-out VQA questions (VQAv2 format).

    python tools/make_sft_demo_data.py --out data/demo_sft

Logic in pretrain/sft/demo.py; `make demo-sft` runs this, ingests train.json with
`tools/prepare_data.py llava`, fine-tunes runs/demo with pretrain/configs/sft_demo.yaml and scores
the held-out questions before and after. Takes about 2 s on one core.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pretrain.sft.demo import make_demo_sft_data  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/demo_sft")
    ap.add_argument("--train", type=int, default=1200, help="conversations about images")
    ap.add_argument("--val", type=int, default=150, help="held-out images (3 questions each)")
    ap.add_argument("--seed", type=int, default=1234)
    a = ap.parse_args()
    print(json.dumps(make_demo_sft_data(a.out, n_train=a.train, n_val=a.val, seed=a.seed), indent=1))


if __name__ == "__main__":
    main()
