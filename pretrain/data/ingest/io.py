"""Robust reading of ingest containers: JSONL (plain, gzip, zstd), parquet, webdataset tars.

Each generator yields good records and `Skip` events, and never raises on bad data: a malformed
JSON line is one Skip("bad_json"), a truncated gzip/zstd stream or tar ends the file with one
Skip("truncated_input"/"truncated_tar", samples=0) after everything readable before the damage.
Used by captions.py, interleaved.py and text.py, and by the tokenizer trainer (JSONL input).
`Skip` lives here, at the bottom of the ingest stage, so that readers and driver both build on it.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
import zlib
from dataclasses import dataclass
from typing import Iterator, Optional, Union


@dataclass
class Skip:
    """A bad sample (or a bad stretch of a file): counted under `reason`, logged with `where`."""
    reason: str
    where: str
    detail: str = ""
    samples: int = 1  # how many samples it stands for (0: a file-level event, e.g. truncation)


def input_stem(path: str) -> str:
    """The input file's name without its container extensions (keys and task names start with it)."""
    base = os.path.basename(path)
    for ext in (".tar.gz", ".tgz", ".tar", ".parquet", ".jsonl.gz", ".jsonl.zst", ".jsonl", ".json.gz"):
        if base.endswith(ext):
            return base[: -len(ext)]
    return base.split(".")[0]


def _open_binary(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith((".zst", ".zstd")):
        import zstandard
        raw = open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")


def iter_jsonl(path: str) -> Iterator[Union[tuple[int, dict], Skip]]:
    """(line number, object) per good line; Skip per bad line; one Skip if the stream is cut."""
    name = os.path.basename(path)
    lineno = 0
    try:
        with _open_binary(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    yield Skip("bad_json", f"{name}:{lineno}", str(e))
                    continue
                if not isinstance(obj, dict):
                    yield Skip("bad_json", f"{name}:{lineno}", f"expected an object, got {type(obj).__name__}")
                    continue
                yield lineno, obj
    except (EOFError, OSError, zlib.error) as e:
        yield Skip("truncated_input", f"{name}:{lineno + 1}", f"{type(e).__name__}: {e}", samples=0)
    except Exception as e:  # zstandard.ZstdError and friends
        if type(e).__name__ == "ZstdError":
            yield Skip("truncated_input", f"{name}:{lineno + 1}", str(e), samples=0)
        else:
            raise


def iter_parquet(path: str, columns: Optional[list[str]] = None,
                 batch_rows: int = 256) -> Iterator[Union[tuple[int, dict], Skip]]:
    """(row number, row dict) per row; a damaged row group ends the file with a Skip."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    name = os.path.basename(path)
    row = 0
    try:
        pf = pq.ParquetFile(path)
        have = set(pf.schema_arrow.names)
        cols = [c for c in columns if c in have] if columns else None
        for batch in pf.iter_batches(batch_size=batch_rows, columns=cols):
            for rec in batch.to_pylist():
                yield row, rec
                row += 1
    except (pa.ArrowException, OSError) as e:
        yield Skip("truncated_input", f"{name}:row {row}", f"{type(e).__name__}: {e}", samples=0)


def iter_records(path: str, columns: Optional[list[str]] = None) -> Iterator[Union[tuple[str, dict], Skip]]:
    """JSONL or parquet by extension: (place 'file:line', record) or Skip."""
    name = os.path.basename(path)
    if path.endswith(".parquet"):
        for r in iter_parquet(path, columns):
            yield r if isinstance(r, Skip) else (f"{name}:row {r[0]}", r[1])
    else:
        for r in iter_jsonl(path):
            yield r if isinstance(r, Skip) else (f"{name}:{r[0]}", r[1])


def split_member_name(name: str) -> tuple[str, str]:
    """webdataset convention: 'dir/KEY.ext.more' -> ('dir/KEY', 'ext.more')."""
    d, base = os.path.split(name)
    key, _, ext = base.partition(".")
    return (f"{d}/{key}" if d else key), ext.lower()


def iter_tar_samples(path: str) -> Iterator[Union[tuple[str, dict[str, bytes], str], Skip]]:
    """(key, {ext: bytes}, place) per group of adjacent members sharing a key; streamed, so a
    truncated tar yields every complete sample before the damage and then one Skip."""
    name = os.path.basename(path)
    cur_key: Optional[str] = None
    cur: dict[str, bytes] = {}
    reading: Optional[str] = None  # key of the member whose data is being read
    try:
        with tarfile.open(path, "r|*") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, ext = split_member_name(m.name)
                reading = key
                f = tar.extractfile(m)
                data = f.read() if f is not None else b""
                if len(data) != m.size:
                    raise tarfile.ReadError(f"member {m.name} truncated ({len(data)} of {m.size} bytes)")
                reading = None
                if key != cur_key:
                    if cur_key is not None:
                        yield cur_key, cur, f"{name}:{cur_key}"
                    cur_key, cur = key, {}
                cur[ext] = data
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        detail = f"{type(e).__name__}: {e}"
        if reading is not None and reading == cur_key:
            # Broke inside a member of the current sample: that sample is incomplete, dropped.
            yield Skip("truncated_tar", f"{name}:{cur_key}", detail, samples=1)
            return
        if cur_key is not None:  # every member of the current sample was read whole
            yield cur_key, cur, f"{name}:{cur_key}"
        yield Skip("truncated_tar", f"{name}:{reading or 'end'}", detail, samples=1 if reading else 0)
        return
    if cur_key is not None:
        yield cur_key, cur, f"{name}:{cur_key}"
