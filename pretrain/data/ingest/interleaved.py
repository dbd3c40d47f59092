"""Interleaved documents in OBELICS' layout -> RawDoc(parts=[str | image index, ...]).

A document has parallel lists `texts` and `images` of equal length, exactly one of them non-null
at every position. Images are bytes, a {"bytes", "path"} struct, or a local path (relative to the
input file's folder). Inputs, by extension:
  * `.jsonl[.gz|.zst]` / `.parquet`: one document per line / row;
  * `.tar`: webdataset samples KEY.json (the document) + the images stored beside it; an image
    entry of the document then names its member (`KEY.0.jpg`, or just `0.jpg`), or is still the
    URL of OBELICS' release with the downloaded file beside it as `KEY.{i}.jpg` (i: the image's
    position in `images`, or else its number among the images, whichever the member names fit),
    or is any other non-null value, meaning "the next image member of this sample" in name order.
Images given as URLs are read from the download cache (`prepare_data.py --download`); a failed
download removes that image slot (counted by reason) and the document keeps its text and order.
A misaligned document is one Skip("bad_alignment"); a bad image is dropped from its document
(counted under dropped_images) and the document kept.

    python tools/prepare_data.py interleaved --input obelics/*.parquet --output data/web --tokenizer tok.model
"""
from __future__ import annotations

import hashlib
import json
from typing import Iterator, Union

from pretrain.data.ingest.captions import IMAGE_EXTS
from pretrain.data.ingest.download import is_url
from pretrain.data.ingest.driver import BadImage, IngestConfig, RawDoc, Skip
from pretrain.data.ingest.image_refs import ImageRefs
from pretrain.data.ingest.io import iter_records, iter_tar_samples
from pretrain.data.ingest.text import record_key


def doc_from_record(rec: dict, where: str, key: str, image_of) -> Union[RawDoc, Skip]:
    """image_of(value, position, ordinal) -> (bytes | None, reason). Checks the OBELICS alignment
    rules: parallel lists, never both a text and an image at one position (both null is taken
    for an image slot whose download failed: dropped and counted, the document kept)."""
    texts, images = rec.get("texts"), rec.get("images")
    if not isinstance(texts, list) or not isinstance(images, list):
        return Skip("bad_alignment", where, "`texts` and `images` must both be lists")
    if len(texts) != len(images):
        return Skip("bad_alignment", where, f"{len(texts)} texts vs {len(images)} images")
    parts, blobs = [], []
    for i, (t, im) in enumerate(zip(texts, images)):
        if t is None and im is None:
            # Both null: how download glue marks an image that could not be fetched. The slot
            # goes (counted as an empty_slot image), the document stays.
            parts.append(len(blobs))
            blobs.append(BadImage("empty_slot", f"position {i}: text and image both null"))
            continue
        if t is not None and im is not None:
            return Skip("bad_alignment", where, f"position {i}: both a text and an image")
        if t is not None:
            if not isinstance(t, str):
                return Skip("bad_alignment", where, f"position {i}: text is {type(t).__name__}")
            if t.strip():
                parts.append(t)
            continue
        data, reason = image_of(im, i, len(blobs))
        parts.append(len(blobs))
        # An unreadable reference stays in place as a BadImage: the driver drops and counts it.
        blobs.append(data if data is not None else BadImage(reason, f"position {i}: {str(im)[:80]}"))
    if not parts:
        return Skip("empty_document", where, "no text and no image")
    return RawDoc(key=key, parts=parts, images=blobs, where=where, drop_bad_images=True)


def _content_id(rec: dict) -> str:
    return hashlib.sha1(json.dumps([rec.get("texts"), rec.get("images")], default=str).encode()).hexdigest()


def _tar_image_of(rec: dict, members: dict, key: str, refs: ImageRefs):
    """image_of for one tar sample (see the module docstring for the member naming rules)."""
    base = key.rsplit("/", 1)[-1]
    numbered = {}  # KEY.{n}.ext members: n -> ext
    for e in members:
        n, _, ext = e.partition(".")
        if n.isdigit() and ext in IMAGE_EXTS:
            numbered[int(n)] = e
    images = rec.get("images") if isinstance(rec.get("images"), list) else []
    by_position = set(numbered) <= {i for i, v in enumerate(images) if v is not None}
    queue = iter(sorted(e for e in members if e.rsplit(".", 1)[-1] in IMAGE_EXTS))

    def image_of(v, position: int, ordinal: int):
        if is_url(v):
            if numbered:
                e = numbered.get(position if by_position else ordinal)
                return (members[e], "") if e is not None else (None, "missing_image_file")
            if refs.cache is not None or not members.keys() - {"json"}:
                return refs.read(v)  # no image beside the document: the download cache
        elif isinstance(v, str):
            ext = (v[len(base) + 1:] if v.startswith(base + ".") else v).lower()
            return (members[ext], "") if ext in members else (None, "missing_image_file")
        nxt = next(queue, None)
        return (members[nxt], "") if nxt is not None else (None, "missing_image_file")
    return image_of


def read_interleaved(path: str, cfg: IngestConfig) -> Iterator[Union[RawDoc, Skip]]:
    refs = ImageRefs(path, cfg.image_root, cfg.download_cache)
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
            yield doc_from_record(rec, where, key, _tar_image_of(rec, members, key, refs))
        return
    for item in iter_records(path, required=("texts", "images")):
        if isinstance(item, Skip):
            yield item
            continue
        where, rec = item
        yield doc_from_record(rec, where, record_key(rec, where, lambda: _content_id(rec)),
                              lambda v, i, k: refs.read(v))
