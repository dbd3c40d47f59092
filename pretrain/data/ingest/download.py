"""Images of URL-only documents (OBELICS as released), fetched with img2dataset and cached by URL.

`tools/prepare_data.py interleaved|captions --download` runs this before the ingest:
  1. `collect_urls` lists the http(s) image references of the parquet/JSONL inputs (only the
     image column is read from parquet);
  2. `download_missing` fetches those not yet in the cache with img2dataset's downloader (its
     threads, retries, timeout, user-agent token and X-Robots-Tag opt-out directives: an image
     served with `X-Robots-Tag: noai` etc. is not used), keeping the bytes exactly as served (no
     re-encoding: the ingest decodes every image once, with its own checks);
  3. the ingest then resolves every URL through the cache (`UrlCache.get`, see image_refs.py): a
     cached image is used, a cached failure removes that image slot (its document keeps its text
     and order) and is counted under its reason (`download_http_404`, `download_opted_out`,
     `download_timeout`, `download_not_an_image`, `download_error`).

The cache (`--download-cache DIR`, default OUTPUT/.download_cache) holds one file per URL,
`objects/ab/<sha1(url)>.img` (the bytes) or `.err` (JSON reason and message), written atomically
as each img2dataset shard of `shard_urls` URLs finishes. A restarted run therefore fetches nothing
that was cached, failures included (`retry_failed` fetches those again); an interrupted shard is
fetched again whole. URLs are fetched in shards of `shard_urls` by `processes` worker processes,
`threads` connections each.

img2dataset is installed from requirements-download.txt (see the Makefile); it is imported only
when something must be fetched.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

log = logging.getLogger("pretrain.data.ingest.download")

REMOTE_PREFIXES = ("http://", "https://")
# img2dataset's default opt-out directives (X-Robots-Tag: noai, noimageai, noindex, noimageindex).
DEFAULT_DISALLOWED = ("noai", "noimageai", "noindex", "noimageindex")


def is_url(value) -> bool:
    return isinstance(value, str) and value.startswith(REMOTE_PREFIXES)


@dataclass
class DownloadConfig:
    # Cache directory (one file per URL, see the module docstring).
    cache: str
    # img2dataset worker processes (each fetches one shard of `shard_urls` URLs at a time).
    processes: int = 1
    # Concurrent connections per process.
    threads: int = 32
    # Seconds before one request is abandoned.
    timeout: float = 10.0
    # Extra attempts per URL after a failure.
    retries: int = 1
    # Token sent in the User-Agent; X-Robots-Tag directives addressed to it are honoured too.
    user_agent_token: str = ""
    # X-Robots-Tag directives that forbid using an image (empty: none honoured).
    disallowed_header_directives: tuple = DEFAULT_DISALLOWED
    # URLs per img2dataset shard (the unit of work lost when a run is interrupted).
    shard_urls: int = 1000
    # Fetch URLs whose earlier attempt failed (default: a cached failure is final).
    retry_failed: bool = False
    progress: bool = True

    def validate(self) -> None:
        if self.processes < 1 or self.threads < 1 or self.shard_urls < 1:
            raise ValueError("DownloadConfig: processes, threads and shard_urls must be >= 1")
        if self.timeout <= 0 or self.retries < 0:
            raise ValueError("DownloadConfig: timeout must be > 0 and retries >= 0")


class UrlCache:
    """One file per URL: `<sha1>.img` (bytes as served) or `<sha1>.err` (why it failed)."""

    def __init__(self, root: str):
        self.root = root

    def _base(self, url: str) -> str:
        h = hashlib.sha1(url.encode("utf-8", "surrogatepass")).hexdigest()
        return os.path.join(self.root, "objects", h[:2], h)

    def status(self, url: str) -> Optional[str]:
        """'ok', 'failed', or None (never fetched)."""
        base = self._base(url)
        if os.path.exists(base + ".img"):
            return "ok"
        return "failed" if os.path.exists(base + ".err") else None

    def get(self, url: str) -> tuple[Optional[bytes], str]:
        """(bytes, '') or (None, reason): the failure's reason, or 'not_downloaded'."""
        base = self._base(url)
        try:
            with open(base + ".img", "rb") as f:
                return f.read(), ""
        except FileNotFoundError:
            pass
        try:
            with open(base + ".err") as f:
                return None, json.load(f)["reason"]
        except (FileNotFoundError, ValueError, KeyError):
            return None, "not_downloaded"

    def _write(self, path: str, data: bytes) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)

    def put_image(self, url: str, data: bytes) -> None:
        base = self._base(url)
        self._write(base + ".img", data)
        with contextlib.suppress(FileNotFoundError):
            os.remove(base + ".err")

    def put_failure(self, url: str, reason: str, message: str) -> None:
        self._write(self._base(url) + ".err",
                    json.dumps({"url": url, "reason": reason, "message": message[:500]}).encode())


def failure_reason(message: str) -> str:
    """img2dataset's error message -> a counter name."""
    m = re.search(r"HTTP Error (\d{3})", message)
    if m:
        return f"download_http_{m.group(1)}"
    if "X-Robots-Tag" in message:
        return "download_opted_out"
    if "timed out" in message.lower() or "timeout" in message.lower():
        return "download_timeout"
    return "download_error"


def _looks_like_image(data: bytes) -> bool:
    """Header sniff (no decode): an HTML error page served as 200 is not an image."""
    import io

    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(io.BytesIO(data)):
            return True
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return False
    except Exception:  # e.g. DecompressionBombError: an image, judged later by the ingest
        return True


def collect_urls(paths: Iterable[str], column: str) -> Iterator[str]:
    """Every http(s) reference in `column` (a URL or a list of them, as OBELICS' `images`) of the
    parquet / JSONL inputs; tars carry their images beside the documents and are not read."""
    from pretrain.data.ingest.io import Skip, iter_records
    for path in paths:
        if path.endswith((".tar", ".tar.gz", ".tgz")):
            continue
        for item in iter_records(path, columns=[column]):
            if isinstance(item, Skip):
                continue
            value = item[1].get(column)
            for v in (value if isinstance(value, list) else [value]):
                if isinstance(v, dict):
                    v = v.get("url") or v.get("path")
                if is_url(v):
                    yield v


@dataclass
class DownloadStats:
    urls: int = 0  # distinct URLs referenced
    cached: int = 0  # already in the cache (fetched or failed before)
    fetched: int = 0  # fetched now and stored
    failed: dict = field(default_factory=dict)  # reason -> URLs that failed now
    shards_failed: int = 0  # img2dataset shards that died (their URLs stay unfetched)


def download_missing(urls: Iterable[str], dcfg: DownloadConfig) -> DownloadStats:
    """Fetch every URL the cache does not hold; returns what was found and done."""
    dcfg.validate()
    cache = UrlCache(dcfg.cache)
    work = os.path.join(dcfg.cache, "_work")
    stats = DownloadStats()
    if os.path.isdir(work):  # an interrupted run: keep what finished, redo the rest
        _import_outputs(os.path.join(work, "out"), cache, stats)
        shutil.rmtree(work)
    todo, seen = [], set()
    for u in urls:
        if u in seen:
            continue
        seen.add(u)
        st = cache.status(u)
        if st is None or (st == "failed" and dcfg.retry_failed):
            todo.append(u)
    stats.urls, stats.cached = len(seen), len(seen) - len(todo)
    if not todo:
        return stats
    log.info("downloading %d of %d image URLs (%d cached) into %s", len(todo), len(seen),
             stats.cached, dcfg.cache)
    rows = _write_url_shards(todo, os.path.join(work, "in"), dcfg.shard_urls)
    _run_img2dataset(rows, os.path.join(work, "out"), dcfg, cache, stats)
    shutil.rmtree(work, ignore_errors=True)
    return stats


def _write_url_shards(urls: list[str], folder: str, per_shard: int) -> list[tuple[int, str]]:
    import pyarrow as pa
    os.makedirs(folder, exist_ok=True)
    rows = []
    for sid, i in enumerate(range(0, len(urls), per_shard)):
        path = os.path.join(folder, f"{sid:06d}.feather")
        table = pa.table({"url": urls[i:i + per_shard]})
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table)
        rows.append((sid, path))
    return rows


def _import_outputs(out_dir: str, cache: UrlCache, stats: DownloadStats, only: Optional[str] = None) -> None:
    """img2dataset parquet shards -> one cache file per URL (then the shard is deleted)."""
    import pyarrow.parquet as pq
    if not os.path.isdir(out_dir):
        return
    for name in sorted(os.listdir(out_dir)):
        if not name.endswith(".parquet") or (only is not None and name != only):
            continue
        path = os.path.join(out_dir, name)
        try:
            rows = pq.read_table(path, columns=["url", "status", "error_message", "jpg"]).to_pylist()
        except Exception as e:  # a shard cut by the interruption: its URLs are fetched again
            log.warning("img2dataset output %s unreadable (%s); its URLs will be fetched again", path, e)
            os.remove(path)
            continue
        for r in rows:
            data = r["jpg"]
            if r["status"] == "success" and data is not None:
                if _looks_like_image(data):
                    cache.put_image(r["url"], data)
                    stats.fetched += 1
                    continue
                reason, msg = "download_not_an_image", f"served {len(data)} bytes that are no image"
            else:
                msg = r["error_message"] or r["status"] or "unknown"
                reason = failure_reason(msg)
            cache.put_failure(r["url"], reason, msg)
            stats.failed[reason] = stats.failed.get(reason, 0) + 1
        os.remove(path)


def _quiet_worker() -> None:
    # img2dataset prints progress/tracebacks to stdout; ours carries the JSON summary.
    sys.stdout = sys.stderr


def _run_img2dataset(rows, out_dir: str, dcfg: DownloadConfig, cache: UrlCache, stats: DownloadStats) -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations phones home on import
    try:
        with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # img2dataset imports imghdr
            from img2dataset.downloader import Downloader
            from img2dataset.resizer import Resizer
            from img2dataset.writer import ParquetSampleWriter
    except ImportError as e:
        raise RuntimeError(f"--download needs img2dataset ({e}); install it with "
                           f"`pip install --no-deps -r requirements-download.txt`") from None
    os.makedirs(out_dir, exist_ok=True)
    oom_shards = max(6, len(str(len(rows))))
    downloader = Downloader(
        sample_writer_class=ParquetSampleWriter,
        # No resizing, no re-encoding: the bytes as served (the ingest decodes them once).
        resizer=Resizer(image_size=0, resize_mode="no", resize_only_if_bigger=False,
                        disable_all_reencoding=True),
        thread_count=dcfg.threads, save_caption=False, extract_exif=False, output_folder=out_dir,
        column_list=["url"], timeout=dcfg.timeout, number_sample_per_shard=dcfg.shard_urls,
        oom_shard_count=oom_shards, compute_hash=None, verify_hash_type=None, encode_format="jpg",
        retries=dcfg.retries, user_agent_token=dcfg.user_agent_token or None,
        disallowed_header_directives=list(dcfg.disallowed_header_directives) or None)
    bar = None
    if dcfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=len(rows), unit="shard", desc="download")

    def done(ok: bool, row) -> None:
        sid = row[0]
        if not ok:
            stats.shards_failed += 1
            log.error("img2dataset shard %d failed; its URLs stay unfetched (rerun to retry)", sid)
        _import_outputs(out_dir, cache, stats, only=f"{sid:0{oom_shards}d}.parquet")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(fetched=stats.fetched, failed=sum(stats.failed.values()), refresh=False)

    if dcfg.processes == 1:
        with contextlib.redirect_stdout(sys.stderr):
            for row in rows:
                done(*downloader(row))
    else:
        import multiprocessing as mp
        with mp.get_context("spawn").Pool(dcfg.processes, initializer=_quiet_worker) as pool:
            for ok, row in pool.imap_unordered(downloader, rows):
                done(ok, row)
    if bar is not None:
        bar.close()
