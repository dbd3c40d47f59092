"""Turn raw web data into training shards + manifest (logic in pretrain/data/ingest/).

    python tools/prepare_data.py captions    --input laion/{00000..00099}.tar --output data/web --tokenizer tok.model
    python tools/prepare_data.py interleaved --input obelics/*.parquet       --output data/web --tokenizer tok.model
    python tools/prepare_data.py text        --input dclm/*.jsonl.zst        --output data/web --tokenizer tok.model

Each input file is one task (use --workers N to run N at once); an interrupted run restarts where
it stopped (inputs already done are not redone). Bad samples are counted by reason and skipped;
the summary is printed as JSON at the end (and written to OUTPUT/.ingest/{source}/summary.json).
Several sources go into one OUTPUT: each run merges its source into OUTPUT/manifest.json.
"""
import argparse
import glob
import json
import logging
import os
import sys
from dataclasses import asdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pretrain.data.ingest.driver import IngestConfig, run_ingest  # noqa: E402

DEFAULT_SOURCE = {"captions": "caption", "interleaved": "interleaved", "text": "text"}


def reader_for(kind: str):
    if kind == "captions":
        from pretrain.data.ingest.captions import read_captions
        return read_captions
    if kind == "interleaved":
        from pretrain.data.ingest.interleaved import read_interleaved
        return read_interleaved
    from pretrain.data.ingest.text import read_text
    return read_text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=sorted(DEFAULT_SOURCE))
    ap.add_argument("--input", nargs="+", required=True, help="files or glob patterns")
    ap.add_argument("--output", required=True)
    ap.add_argument("--tokenizer", required=True, help="sentencepiece .model (tools/train_tokenizer.py)")
    ap.add_argument("--source", default=None, help="source name (default: caption / interleaved / text)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--val-fraction", type=float, default=IngestConfig.val_fraction)
    ap.add_argument("--shard-samples", type=int, default=IngestConfig.shard_samples)
    ap.add_argument("--image-size", type=int, default=IngestConfig.image_size,
                    help="stored shorter side in pixels (never upscaled)")
    ap.add_argument("--max-pixels", type=int, default=IngestConfig.max_pixels)
    ap.add_argument("--min-image-size", type=int, default=IngestConfig.min_image_size)
    ap.add_argument("--jpeg-quality", type=int, default=IngestConfig.jpeg_quality)
    ap.add_argument("--image-column", default=IngestConfig.image_column)
    ap.add_argument("--caption-column", default=IngestConfig.caption_column)
    ap.add_argument("--text-field", default=IngestConfig.text_field)
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    inputs = []
    for pat in a.input:
        hits = sorted(glob.glob(pat)) if any(c in pat for c in "*?[") else [pat]
        if not hits:
            raise SystemExit(f"prepare_data: --input {pat!r} matches no file")
        inputs.extend(hits)
    missing = [p for p in inputs if not os.path.isfile(p)]
    if missing:
        raise SystemExit(f"prepare_data: input file(s) not found: {missing[:5]}")
    cfg = IngestConfig(output=a.output, tokenizer=a.tokenizer, source=a.source or DEFAULT_SOURCE[a.kind],
                       val_fraction=a.val_fraction, shard_samples=a.shard_samples, image_size=a.image_size,
                       max_pixels=a.max_pixels, min_image_size=a.min_image_size, jpeg_quality=a.jpeg_quality,
                       workers=a.workers, image_column=a.image_column, caption_column=a.caption_column,
                       text_field=a.text_field, progress=not a.no_progress)
    try:
        stats = run_ingest(sorted(set(inputs)), cfg, reader_for(a.kind))
    except ValueError as e:
        raise SystemExit(f"prepare_data: {e}")
    summary = {"source": cfg.source, "output": os.path.abspath(a.output), **asdict(stats)}
    os.makedirs(os.path.join(a.output, ".ingest", cfg.source), exist_ok=True)
    with open(os.path.join(a.output, ".ingest", cfg.source, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
