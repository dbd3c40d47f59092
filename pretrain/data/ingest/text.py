"""Text documents (DCLM style JSONL with a `text` field, plain, .gz or .zst) -> RawDoc([text]).

The key is the record's `id`/`key`/`url` field when present (hashed into a clean key), else
`{file}_{line}`, so the train/val split is stable across runs and machines.

    python tools/prepare_data.py text --input dclm/*.jsonl.zst --output data/web --tokenizer tok.model
"""
from __future__ import annotations

from typing import Iterator, Union

from pretrain.data.ingest.driver import IngestConfig, RawDoc, Skip
from pretrain.data.ingest.io import input_stem, iter_records


def record_key(rec: dict, stem: str, where: str) -> str:
    for f in ("id", "key", "url"):
        if rec.get(f) is not None:
            return f"{stem}_{rec[f]}"
    return f"{stem}_{where.rsplit(':', 1)[-1].replace(' ', '')}"


def read_text(path: str, cfg: IngestConfig) -> Iterator[Union[RawDoc, Skip]]:
    stem = input_stem(path)
    for item in iter_records(path):
        if isinstance(item, Skip):
            yield item
            continue
        where, rec = item
        text = rec.get(cfg.text_field)
        if not isinstance(text, str) or not text.strip():
            yield Skip("missing_text", where, f"field {cfg.text_field!r} empty or absent")
            continue
        yield RawDoc(key=record_key(rec, stem, where), parts=[text], images=[], where=where, needs_text=True)
