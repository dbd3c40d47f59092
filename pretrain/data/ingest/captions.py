"""Image-caption pairs -> RawDoc(parts=[image 0, caption]) for the ingest driver (driver.py).

Inputs, by extension:
  * `.tar` (also .tar.gz/.tgz): webdataset tars in img2dataset's layout: KEY.jpg (or .jpeg,
    .png, .webp) with KEY.txt and/or KEY.json holding the caption (.txt wins; in .json the
    `caption` field, else `text`). Keys are qualified with the tar's name (`{tar}_{key}`), since
    img2dataset restarts its numbering in every output folder.
  * `.parquet` / `.jsonl[.gz|.zst]`: one row per pair; `IngestConfig.image_column` holds bytes,
    a local path (relative to the input file's folder), or a {"bytes", "path"} struct (Hugging Face
    datasets); `IngestConfig.caption_column` the caption; the key is the `key`/`id` column if
    present, else `{file}_{row}`.
Bad samples are yielded as Skip: missing_image, missing_caption, bad_json, truncated_tar, ...

    python tools/prepare_data.py captions --input shards/*.tar --output data/web --tokenizer tok.model
"""
from __future__ import annotations

import os
from typing import Iterator, Union

from pretrain.data.ingest.driver import IngestConfig, RawDoc, Skip
from pretrain.data.ingest.io import input_stem, iter_records, iter_tar_samples

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def _caption_of_json(raw: bytes, field_names=("caption", "text")):
    import json
    try:
        d = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(d, dict):
        for f in field_names:
            if isinstance(d.get(f), str):
                return d[f]
    return None


def read_image_field(value, base_dir: str) -> tuple[bytes | None, str]:
    """bytes | path | {"bytes", "path"} -> (bytes or None, reason when None)."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"]), ""
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), ""
    if isinstance(value, str) and value:
        if value.startswith(("http://", "https://")):
            return None, "remote_image"  # ingest never downloads; run img2dataset first
        path = value if os.path.isabs(value) else os.path.join(base_dir, value)
        try:
            with open(path, "rb") as f:
                return f.read(), ""
        except OSError:
            return None, "missing_image_file"
    return None, "missing_image"


def read_captions(path: str, cfg: IngestConfig) -> Iterator[Union[RawDoc, Skip]]:
    stem = input_stem(path)
    if path.endswith((".tar", ".tar.gz", ".tgz")):
        for item in iter_tar_samples(path):
            if isinstance(item, Skip):
                yield item
                continue
            key, members, where = item
            img_ext = next((e for e in IMAGE_EXTS if e in members), None)
            if img_ext is None:
                if set(members) <= {"json", "txt"} and members.get("json") and b'"status"' in members["json"] \
                        and b'"success"' not in members["json"]:
                    yield Skip("failed_download", where, "img2dataset status is not success")
                else:
                    yield Skip("missing_image", where, f"members: {sorted(members)}")
                continue
            caption = None
            if "txt" in members:
                try:
                    caption = members["txt"].decode("utf-8")
                except UnicodeDecodeError:
                    yield Skip("bad_caption_encoding", where, "KEY.txt is not UTF-8")
                    continue
            elif "json" in members:
                caption = _caption_of_json(members["json"])
            if not caption or not caption.strip():
                yield Skip("missing_caption", where, "no KEY.txt and no caption in KEY.json")
                continue
            yield RawDoc(key=f"{stem}_{key.replace('/', '_')}", parts=[0, caption.strip()],
                         images=[members[img_ext]], where=where, needs_text=True)
        return
    base_dir = os.path.dirname(os.path.abspath(path))
    for item in iter_records(path):
        if isinstance(item, Skip):
            yield item
            continue
        where, rec = item
        caption = rec.get(cfg.caption_column)
        if not isinstance(caption, str) or not caption.strip():
            yield Skip("missing_caption", where, f"column {cfg.caption_column!r} empty or absent")
            continue
        data, reason = read_image_field(rec.get(cfg.image_column), base_dir)
        if data is None:
            yield Skip(reason, where, f"column {cfg.image_column!r}")
            continue
        rid = rec.get("key", rec.get("id"))
        key = f"{stem}_{rid}" if rid is not None else f"{stem}_{where.rsplit(':', 1)[-1].replace(' ', '')}"
        yield RawDoc(key=key, parts=[0, caption.strip()], images=[data], where=where, needs_text=True)
