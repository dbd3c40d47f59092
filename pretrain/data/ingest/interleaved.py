"""Interleaved documents in OBELICS' layout -> RawDoc(parts=[str | image index, ...]).

A document has parallel lists `texts` and `images` of equal length, exactly one of them non-null
at every position. Images are bytes, a {"bytes", "path"} struct, or a local path (relative to the
input file's folder). Inputs, by extension:
  * `.jsonl[.gz|.zst]` / `.parquet`: one document per line / row;
  * `.tar`: webdataset samples KEY.json (the document) + the images stored beside it; an image
    entry of the document then names its member (`KEY.0.jpg`, or just `0.jpg`) or is any other
    non-null value, meaning "the next image member of this sample" in name order.
A misaligned document is one Skip("bad_alignment"); a bad image is dropped from its document
(counted under dropped_images) and the document kept.

    python tools/prepare_data.py interleaved --input obelics/*.parquet --output data/web --tokenizer tok.model
"""
from __future__ import annotations

import json
import os
from typing import Iterator, Union

from pretrain.data.ingest.driver import BadImage, IngestConfig, RawDoc, Skip
from pretrain.data.ingest.captions import IMAGE_EXTS, read_image_field
from pretrain.data.ingest.io import input_stem, iter_records, iter_tar_samples
from pretrain.data.ingest.text import record_key


def doc_from_record(rec: dict, where: str, key: str, image_of) -> Union[RawDoc, Skip]:
    """image_of(value) -> (bytes | None, reason). Checks the OBELICS alignment rules."""
    texts, images = rec.get("texts"), rec.get("images")
    if not isinstance(texts, list) or not isinstance(images, list):
        return Skip("bad_alignment", where, "`texts` and `images` must both be lists")
    if len(texts) != len(images):
        return Skip("bad_alignment", where, f"{len(texts)} texts vs {len(images)} images")
    parts, blobs = [], []
    for i, (t, im) in enumerate(zip(texts, images)):
        if (t is None) == (im is None):
            return Skip("bad_alignment", where, f"position {i}: need exactly one of text/image")
        if t is not None:
            if not isinstance(t, str):
                return Skip("bad_alignment", where, f"position {i}: text is {type(t).__name__}")
            if t.strip():
                parts.append(t)
            continue
        data, reason = image_of(im)
        parts.append(len(blobs))
        # An unreadable reference stays in place as a BadImage: the driver drops and counts it.
        blobs.append(data if data is not None else BadImage(reason, f"position {i}: {str(im)[:80]}"))
    if not parts:
        return Skip("empty_document", where, "no text and no image")
    return RawDoc(key=key, parts=parts, images=blobs, where=where, drop_bad_images=True)


def read_interleaved(path: str, cfg: IngestConfig) -> Iterator[Union[RawDoc, Skip]]:
    stem = input_stem(path)
    if path.endswith((".tar", ".tar.gz", ".tgz")):
        for item in iter_tar_samples(path):
            if isinstance(item, Skip):
                yield item
                continue
            key, members, where = item
            if "json" not in members:
                yield Skip("missing_document", where, f"members: {sorted(members)}")
                continue
            try:
                rec = json.loads(members["json"])
                if not isinstance(rec, dict):
                    raise ValueError("not an object")
            except (ValueError, UnicodeDecodeError) as e:
                yield Skip("bad_json", where, str(e))
                continue
            image_members = sorted(e for e in members if e.rsplit(".", 1)[-1] in IMAGE_EXTS)
            queue = iter(image_members)
            base = os.path.basename(key)

            def image_of(v, members=members, queue=queue, base=base):
                if isinstance(v, str):
                    ext = v[len(base) + 1:] if v.startswith(base + ".") else v
                    return (members[ext.lower()], "") if ext.lower() in members else (None, "missing_image_file")
                nxt = next(queue, None)
                return (members[nxt], "") if nxt is not None else (None, "missing_image_file")
            yield doc_from_record(rec, where, f"{stem}_{key.replace('/', '_')}", image_of)
        return
    base_dir = os.path.dirname(os.path.abspath(path))
    for item in iter_records(path):
        if isinstance(item, Skip):
            yield item
            continue
        where, rec = item
        yield doc_from_record(rec, where, record_key(rec, stem, where),
                              lambda v: read_image_field(v, base_dir))
