"""Train the sentencepiece tokenizer (with <boi> <eoi> <s> </s> <pad> as control symbols).

    python tools/train_tokenizer.py --input a.txt b.txt --output data/tok/tokenizer --vocab-size 1024
    python tools/train_tokenizer.py --input dclm/*.jsonl.zst --output data/tok/tok --vocab-size 65536 --max-lines 2000000

Inputs: plain text files (one sentence/paragraph per line) or the text JSONL that ingest reads
(plain/.gz/.zst, field --text-field). A uniform sample of --max-lines lines is used. <boi> <eoi>
<s> </s> <pad> are control symbols: no raw text can produce them. Logic in pretrain/data/tokenizer.py.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pretrain.data.tokenizer import Tokenizer, sample_training_text, train_tokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", required=True)
    ap.add_argument("--output", required=True, help="model prefix: writes PREFIX.model and PREFIX.vocab")
    ap.add_argument("--vocab-size", type=int, default=512)
    ap.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    ap.add_argument("--max-lines", type=int, default=2_000_000, help="lines sampled for training")
    ap.add_argument("--text-field", default="text", help="JSONL field holding the text")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args()
    for p in a.input:
        if not os.path.isfile(p):
            raise SystemExit(f"train_tokenizer: input file not found: {p}")
    try:
        lines = sample_training_text(a.input, a.max_lines, a.text_field, a.seed)
    except ValueError as e:
        raise SystemExit(f"train_tokenizer: {e}")
    print(f"training on {len(lines)} sampled lines")
    path = train_tokenizer(iter(lines), a.output, a.vocab_size, a.model_type, num_threads=a.threads)
    print(f"wrote {path} ({Tokenizer(path).vocab_size} pieces)")


if __name__ == "__main__":
    main()
