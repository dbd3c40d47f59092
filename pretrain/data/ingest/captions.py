"""Image-caption pairs -> RawDoc(parts=[image 0, caption]) for the ingest driver (driver.py).

Inputs, by extension:
  * `.tar` (also .tar.gz/.tgz): webdataset tars in img2dataset's layout: KEY.jpg (or .jpeg,
    .png, .webp) with KEY.txt and/or KEY.json holding the caption (.txt wins; in .json the
    `caption` field, else `text`).
  * `.parquet` / `.jsonl[.gz|.zst]`: one row per pair; `IngestConfig.image_column` holds bytes,
    a local path, a URL (fetched by `--download`) or a {"bytes", "path"} struct (Hugging Face
    datasets), resolved by image_refs.py; `IngestConfig.caption_column` the caption; the key is
    the `key`/`id` column if present, else the row number. A parquet file without those columns
    fails with an error naming the columns it has. img2dataset's parquet output works as is with
    `--image-column jpg` (its rows whose `status` is not success count as failed_download).
Keys are local to the file; the driver qualifies them with the input's path relative to the
other inputs (img2dataset restarts its numbering in every output folder).
Bad samples are yielded as Skip: missing_image, missing_caption, bad_json, truncated_tar, ...

    python tools/prepare_data.py captions --input shards/*.tar --output data/web --tokenizer tok.model
"""
from __future__ import annotations

from typing import Iterator, Union

from pretrain.data.ingest.driver import IngestConfig, RawDoc, Skip
from pretrain.data.ingest.image_refs import ImageRefs
from pretrain.data.ingest.io import absent_field, iter_records, iter_tar_samples

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


def read_captions(path: str, cfg: IngestConfig) -> Iterator[Union[RawDoc, Skip]]:
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
            yield RawDoc(key=key, parts=[0, caption.strip()], images=[members[img_ext]], where=where,
                         needs_text=True, is_caption=True)
        return
    refs = ImageRefs(path, cfg.image_root, cfg.download_cache)
    for item in iter_records(path, required=(cfg.caption_column, cfg.image_column)):
        if isinstance(item, Skip):
            yield item
            continue
        where, rec = item
        if rec.get("status") not in (None, "success"):  # img2dataset's parquet lists its failures
            yield Skip("failed_download", where, f"img2dataset status {rec['status']}: {rec.get('error_message')}")
            continue
        caption = rec.get(cfg.caption_column)
        if not isinstance(caption, str) or not caption.strip():
            yield Skip("missing_caption", where, absent_field(rec, cfg.caption_column, "column"))
            continue
        data, reason = refs.read(rec.get(cfg.image_column))
        if data is None:
            detail = absent_field(rec, cfg.image_column, "column") if reason == "missing_image" else \
                f"column {cfg.image_column!r}: {str(rec.get(cfg.image_column))[:100]}"
            yield Skip(reason, where, detail)
            continue
        rid = rec.get("key", rec.get("id"))
        key = str(rid) if rid is not None else where.rsplit(":", 1)[-1].replace(" ", "")
        yield RawDoc(key=key, parts=[0, caption.strip()], images=[data], where=where, needs_text=True,
                     is_caption=True)
