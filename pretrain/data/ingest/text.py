"""Text documents (DCLM style JSONL with a `text` field, plain, .gz or .zst) -> RawDoc([text]).

The key is the record's `id`/`key` field when present; else, when it has a `url`, the URL plus a
hash of the content (distinct documents of one page both survive; exact duplicates share the key
and the driver drops and counts the second); else the line number. The driver qualifies keys
with the input's relative path, so the train/val split is stable across runs and machines. A
parquet input without the text column fails with an error naming the columns it has.

    python tools/prepare_data.py text --input dclm/*.jsonl.zst --output data/web --tokenizer tok.model
"""
from __future__ import annotations

import hashlib
from typing import Callable, Iterator, Union

from pretrain.data.ingest.driver import IngestConfig, RawDoc, Skip
from pretrain.data.ingest.io import absent_field, iter_records


def record_key(rec: dict, where: str, content_id: Callable[[], str]) -> str:
    """A key local to the input file (see the module docstring); content_id() hashes the content."""
    for f in ("id", "key"):
        if rec.get(f) is not None:
            return str(rec[f])
    if rec.get("url") is not None:
        return f"{rec['url']}#{content_id()[:16]}"
    return where.rsplit(":", 1)[-1].replace(" ", "")


def read_text(path: str, cfg: IngestConfig) -> Iterator[Union[RawDoc, Skip]]:
    for item in iter_records(path, required=(cfg.text_field,)):
        if isinstance(item, Skip):
            yield item
            continue
        where, rec = item
        text = rec.get(cfg.text_field)
        if not isinstance(text, str) or not text.strip():
            yield Skip("missing_text", where, absent_field(rec, cfg.text_field))
            continue
        key = record_key(rec, where, lambda: hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest())
        yield RawDoc(key=key, parts=[text], images=[], where=where, needs_text=True)
