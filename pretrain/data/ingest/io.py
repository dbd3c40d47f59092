"""Robust reading of ingest containers: JSONL (plain, gzip, zstd), parquet, webdataset tars.

Each generator yields good records and `Skip` events, and never raises on bad data: a malformed
JSON line is one Skip("bad_json"), a truncated gzip/zstd stream or tar ends the file with one
Skip("truncated_input"/"truncated_tar", samples=0) after everything readable before the damage
(zstandard's own stream reader ends quietly inside a cut frame; `_ZstdReader` does not). A parquet
file without a column the reader needs raises `InputError` naming the columns it has: that is a
wrong flag (`--caption-column`), not bad data, and must not turn into zero samples and exit 0.
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


class InputError(ValueError):
    """An input the reader cannot use at all (wrong columns): the input fails, the run says why."""


class _ZstdReader(io.RawIOBase):
    """Decompressed bytes of a (multi-frame) zstd file; EOFError when the file ends inside a frame."""

    def __init__(self, path: str):
        import zstandard
        self._new = zstandard.ZstdDecompressor().decompressobj
        self._f = open(path, "rb")
        self._d = self._new()
        self._in_frame = False
        self._buf, self._pos = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while self._pos >= len(self._buf):
            chunk = self._f.read(1 << 20)
            if not chunk:
                if self._in_frame:
                    raise EOFError("zstd data ends inside a frame (the file was cut short)")
                return 0
            self._buf, self._pos = self._feed(chunk), 0
        n = min(len(b), len(self._buf) - self._pos)
        b[:n] = self._buf[self._pos:self._pos + n]
        self._pos += n
        return n

    def _feed(self, data: bytes) -> bytes:
        out = []
        while data:
            out.append(self._d.decompress(data))
            self._in_frame = not self._d.eof
            if not self._d.eof:
                break
            data, self._d = self._d.unused_data, self._new()
        return b"".join(out)

    def close(self) -> None:
        self._f.close()
        super().close()


def _open_binary(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith((".zst", ".zstd")):
        return io.BufferedReader(_ZstdReader(path), 1 << 16)
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
                    if not line.endswith(b"\n"):  # only the last line can lack it: the file was cut
                        yield Skip("truncated_input", f"{name}:{lineno}", f"last line cut: {e}")
                    else:
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


def iter_parquet(path: str, columns: Optional[list[str]] = None, batch_rows: int = 256,
                 required: tuple[str, ...] = ()) -> Iterator[Union[tuple[int, dict], Skip]]:
    """(row number, row dict) per row; a damaged row group ends the file with a Skip.

    Raises InputError when a `required` column is absent, naming the columns the file has."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    name = os.path.basename(path)
    row = 0
    try:
        pf = pq.ParquetFile(path)
        have = set(pf.schema_arrow.names)
        absent = [c for c in required if c not in have]
        if absent:
            raise InputError(f"{path}: no column {', '.join(map(repr, absent))}; its columns are "
                             f"{', '.join(pf.schema_arrow.names)}")
        cols = [c for c in columns if c in have] if columns else None
        for batch in pf.iter_batches(batch_size=batch_rows, columns=cols):
            for rec in batch.to_pylist():
                yield row, rec
                row += 1
    except (pa.ArrowException, OSError) as e:
        yield Skip("truncated_input", f"{name}:row {row}", f"{type(e).__name__}: {e}", samples=0)


def iter_records(path: str, columns: Optional[list[str]] = None,
                 required: tuple[str, ...] = ()) -> Iterator[Union[tuple[str, dict], Skip]]:
    """JSONL or parquet by extension: (place 'file:line', record) or Skip. `required`: parquet
    columns without which the file is unusable (InputError); JSONL records are checked one by one
    by the reader, see `absent_field`."""
    name = os.path.basename(path)
    if path.endswith(".parquet"):
        for r in iter_parquet(path, columns, required=required):
            yield r if isinstance(r, Skip) else (f"{name}:row {r[0]}", r[1])
    else:
        for r in iter_jsonl(path):
            yield r if isinstance(r, Skip) else (f"{name}:{r[0]}", r[1])


def absent_field(rec: dict, field: str, what: str = "field") -> str:
    """Skip detail for a record without a usable `field`, naming the fields it does have."""
    state = "absent" if field not in rec else f"empty ({type(rec[field]).__name__})"
    return f"{what} {field!r} {state}; the record has {', '.join(map(repr, sorted(rec)))[:200]}"


def split_member_name(name: str) -> tuple[str, str]:
    """webdataset convention: 'dir/KEY.ext.more' -> ('dir/KEY', 'ext.more')."""
    d, base = os.path.split(name)
    key, _, ext = base.partition(".")
    return (f"{d}/{key}" if d else key), ext.lower()


def iter_tar_samples(path: str) -> Iterator[Union[tuple[str, dict[str, bytes], str], Skip]]:
    """(key, {ext: bytes}, place) per group of adjacent members sharing a key; streamed, so a
    truncated tar yields every complete sample before the damage and then one Skip. A member
    whose extension the current group already has starts a new group with the same key
    (`K.jpg K.txt K.jpg K.txt` is two samples, which the driver then counts as a duplicate key)."""
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
                if key != cur_key or ext in cur:
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
