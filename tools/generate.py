"""Generate text from a trained model: caption images, answer questions about them, continue text.

    python tools/generate.py --checkpoint runs/demo --image a.jpg --image b.jpg            # captions
    python tools/generate.py --checkpoint runs/demo --image a.jpg --text "Question: what colour is the shape? Answer:"
    python tools/generate.py --checkpoint exports/demo --text "Anna found" --temperature 0.8 --top-p 0.9 --seed 1
    python tools/generate.py --checkpoint runs/demo --prompts prompts.jsonl --json

Prompts: each --image makes one prompt (the image, then --text if given); --text alone makes one
text prompt; --prompts reads JSON lines {"parts": [{"image": "path"}, "text", ...]} (or
{"image": "path", "text": "..."}) for interleaved prompts. All prompts run as one batch (or
batches of --batch-size) with a KV cache; EOS or a --stop string ends a prompt's generation.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pretrain.generate import generate  # noqa: E402
from pretrain.generate.cli import (add_generation_args, add_model_args, generation_config_from_args,  # noqa: E402
                                   model_from_args)


def _image(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise SystemExit(f"generate: cannot read image {path}: {e}")


def read_prompts(args) -> tuple[list[list], list[str]]:
    """(prompts as lists of parts, a short label for each)."""
    prompts, labels = [], []
    for img in args.image:
        prompts.append([_image(img)] + ([args.text] if args.text else []))
        labels.append(img)
    if args.text and not args.image:
        prompts.append([args.text])
        labels.append(args.text[:40])
    if args.prompts:
        for n, line in enumerate(Path(args.prompts).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                raw = obj["parts"] if "parts" in obj else ([{"image": obj["image"]}] if obj.get("image") else []) \
                    + ([obj["text"]] if obj.get("text") else [])
                parts = [_image(p["image"]) if isinstance(p, dict) else str(p) for p in raw]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise SystemExit(f"generate: {args.prompts}:{n}: not a prompt object ({e})")
            if not parts:
                raise SystemExit(f"generate: {args.prompts}:{n}: empty prompt")
            prompts.append(parts)
            labels.append(f"{args.prompts}:{n}")
    if not prompts:
        raise SystemExit("generate: give --image, --text or --prompts")
    return prompts, labels


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--image", action="append", default=[], help="image file; one prompt each (repeatable)")
    p.add_argument("--text", default="", help="text after each image, or a text-only prompt")
    p.add_argument("--prompts", default=None, help="JSON lines file of prompts")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    add_generation_args(p)
    args = p.parse_args(argv)
    prompts, labels = read_prompts(args)
    gen_cfg = generation_config_from_args(args)
    lm = model_from_args(args)
    print(f"[generate] {lm.source} (step {lm.step}) on {args.device}, {len(prompts)} prompt(s)", file=sys.stderr)
    for start in range(0, len(prompts), args.batch_size):
        outs = generate(lm, prompts[start:start + args.batch_size], gen_cfg)
        for label, g in zip(labels[start:start + args.batch_size], outs):
            if args.json:
                print(json.dumps({"prompt": label, "text": g.text, "finish_reason": g.finish_reason,
                                  "token_ids": g.token_ids}))
            else:
                print(f"{label}: {g.text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
