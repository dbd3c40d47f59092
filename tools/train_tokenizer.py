"""Train the sentencepiece tokenizer (with <boi> <eoi> <s> </s> <pad> as control symbols).

    python tools/train_tokenizer.py --input a.txt b.txt --output data/tok/tokenizer --vocab-size 1024

Input files hold one sentence/paragraph per line. Logic in pretrain/data/tokenizer.py.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pretrain.data.tokenizer import Tokenizer, train_tokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", required=True)
    ap.add_argument("--output", required=True, help="model prefix: writes PREFIX.model and PREFIX.vocab")
    ap.add_argument("--vocab-size", type=int, default=512)
    ap.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    a = ap.parse_args()
    for p in a.input:
        if not os.path.isfile(p):
            raise SystemExit(f"train_tokenizer: input file not found: {p}")
    path = train_tokenizer(a.input, a.output, a.vocab_size, a.model_type)
    print(f"wrote {path} ({Tokenizer(path).vocab_size} pieces)")


if __name__ == "__main__":
    main()
