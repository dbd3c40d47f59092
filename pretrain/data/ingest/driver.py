"""Ingest driver shared by the three formats: images at ingest, skip accounting, resumable tasks.

The format readers (captions.py, interleaved.py, text.py) turn one input
file into a stream of `RawDoc` (a key, parts, raw image bytes) or `Skip` (a bad sample, with its
reason and place). This module does the rest, identically for every format:

  * images: header checked first (pixel limit against decompression bombs, minimum side), JPEGs
    decoded in the DCT domain at reduced scale (PIL `draft`), shorter side resized to
    `IngestConfig.image_size` so the training crop has room, re-encoded as JPEG only when needed
    (an RGB JPEG already at most that size is kept byte for byte, after a full decode proves it
    is not truncated);
  * text tokenized (no BOS/EOS; the loader adds them), split train/val by a stable hash of the key;
  * one task per input file: its shards are named after the file's index (`{split}-{idx}-{n}.tar`)
    and a small done-file `OUT/.ingest/{source}/{idx}.json` is written atomically after its last
    shard is closed. A restarted run skips inputs whose done-file exists (completed shards are not
    redone) and redoes the others from scratch (their shard names are the same, so partial tars
    are overwritten). The manifest is (re)written from the done-files at the end, merged with the
    other sources already in OUT/manifest.json.

Nothing about the data can stop the run: every bad sample, image or file is counted by reason,
logged (first few per reason and file, with the place), and skipped.

Run it through `python tools/prepare_data.py captions|interleaved|text --input ... --output DIR
--tokenizer TOK.model [--workers N]`.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Optional, Union

from PIL import Image, ImageFile, UnidentifiedImageError

from pretrain.data.ingest.io import Skip  # re-exported: the readers take Skip from here with RawDoc
from pretrain.data.shards import ShardInfo, ShardWriter, split_of, write_manifest
from pretrain.data.tokenizer import Tokenizer

log = logging.getLogger("pretrain.data.ingest")

# A truncated image must fail loudly (and be skipped), never be silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass
class IngestConfig:
    # Output directory (manifest.json, tokenizer.model, {source}/{split}-*.tar, .ingest/).
    output: str
    # SentencePiece model; copied to OUTPUT/tokenizer.model (must equal the one already there).
    tokenizer: str
    # Source name written into the shards and the manifest (caption, interleaved, text, ...).
    source: str
    # Fraction of samples (by stable hash of their key) that go to the val split.
    val_fraction: float = 0.01
    # Samples per output shard.
    shard_samples: int = 1000
    # Stored image size: shorter side in pixels after ingest (never upscaled). 256 leaves room for
    # the paper's random-resized crop to 224.
    image_size: int = 256
    # Longer side cap after resize (extreme panoramas are centre-cropped to this); 0: no cap.
    max_long_side: int = 1024
    # Images with more pixels than this (read from the header, before decoding) are skipped:
    # protection against decompression bombs.
    max_pixels: int = 64_000_000
    # Images whose shorter side is below this are skipped (icons, spacer GIFs).
    min_image_size: int = 32
    # JPEG quality when an image must be re-encoded.
    jpeg_quality: int = 90
    # Processes, one input file at a time each (1: everything in this process).
    workers: int = 1
    # Column / field names (captions and interleaved parquet/JSONL; text JSONL).
    image_column: str = "image"
    caption_column: str = "caption"
    text_field: str = "text"
    # Show a progress bar.
    progress: bool = True

    def validate(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"IngestConfig.val_fraction: must be in [0, 1), got {self.val_fraction}")
        if self.shard_samples < 1:
            raise ValueError(f"IngestConfig.shard_samples: must be >= 1, got {self.shard_samples}")
        if self.image_size < 1 or self.min_image_size < 1:
            raise ValueError("IngestConfig.image_size/min_image_size: must be >= 1")
        if self.workers < 1:
            raise ValueError(f"IngestConfig.workers: must be >= 1, got {self.workers}")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.source):
            raise ValueError(f"IngestConfig.source: {self.source!r} must be [A-Za-z0-9_-]+")
        if not os.path.isfile(self.tokenizer):
            raise ValueError(f"IngestConfig.tokenizer: file not found: {self.tokenizer}")


@dataclass
class RawDoc:
    """One sample as a reader found it. parts: str (text) or int k (image k of `images`)."""
    key: str
    parts: list
    images: list  # bytes, or a BadImage when the reader could not get them (missing file, ...)
    where: str  # file:line or tar:member, for log messages
    drop_bad_images: bool = False  # True: a bad image is dropped and the doc kept (interleaved)
    needs_text: bool = False  # True: a doc without text is skipped (caption pairs)


@dataclass
class IngestStats:
    """Counts of one task (input file) or of the whole run (sum of tasks)."""
    samples: int = 0  # written
    images: int = 0  # written
    text_tokens: int = 0  # written
    reencoded: int = 0  # images that had to be decoded, resized and re-encoded
    skipped: dict = field(default_factory=dict)  # reason -> samples skipped (or events)
    dropped_images: dict = field(default_factory=dict)  # reason -> images dropped from kept docs
    seconds: float = 0.0

    def add(self, other: "IngestStats") -> None:
        self.samples += other.samples
        self.images += other.images
        self.text_tokens += other.text_tokens
        self.reencoded += other.reencoded
        self.seconds += other.seconds
        for mine, theirs in [(self.skipped, other.skipped), (self.dropped_images, other.dropped_images)]:
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v


class BadImage(Exception):
    """An image that cannot be used; .reason is the counter name."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def prepare_image(data: bytes, cfg: IngestConfig) -> tuple[bytes, bool]:
    """Raw image bytes -> (JPEG bytes with shorter side <= cfg.image_size, re-encoded?).

    Raises BadImage("corrupt_image" | "too_many_pixels" | "too_small").
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage("too_many_pixels", str(e)) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise BadImage("corrupt_image", str(e)) from None
    with im:
        w, h = im.size
        if w * h > cfg.max_pixels:  # from the header only: nothing decoded yet
            raise BadImage("too_many_pixels", f"{w}x{h}")
        if min(w, h) < cfg.min_image_size:
            raise BadImage("too_small", f"{w}x{h}")
        scale = min(1.0, cfg.image_size / min(w, h))
        tw, th = max(1, round(w * scale)), max(1, round(h * scale))
        too_long = cfg.max_long_side and max(tw, th) > cfg.max_long_side
        try:
            if im.format == "JPEG" and im.mode == "RGB" and scale == 1.0 and not too_long:
                im.load()  # proves the file is complete; the original bytes are kept
                return data, False
            if im.format == "JPEG":
                # Decode directly at 1/2, 1/4 or 1/8 scale in the DCT domain (much cheaper than a
                # full decode followed by a resize); the result is never smaller than (tw, th).
                im.draft("RGB", (tw, th))
            im.load()
            rgb = _to_rgb(im)
            if rgb.size != (tw, th):
                rgb = rgb.resize((tw, th), Image.BICUBIC, reducing_gap=2.0)
            if too_long:
                L = cfg.max_long_side
                x0, y0 = (tw - min(tw, L)) // 2, (th - min(th, L)) // 2
                rgb = rgb.crop((x0, y0, x0 + min(tw, L), y0 + min(th, L)))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise BadImage("corrupt_image", str(e)) from None
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=cfg.jpeg_quality)
    return buf.getvalue(), True


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB; transparent pixels become white (dropping alpha would expose arbitrary colours)."""
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")


_KEY_OK = re.compile(r"[A-Za-z0-9_-]{1,64}")


def clean_key(key: str) -> str:
    """A shard key ([A-Za-z0-9_-], no dots or slashes): kept when already clean, else hashed."""
    key = str(key)
    if _KEY_OK.fullmatch(key):
        return key
    return hashlib.sha1(key.encode("utf-8", "surrogatepass")).hexdigest()[:20]


Reader = Callable[[str, IngestConfig], Iterator[Union[RawDoc, Skip]]]


@dataclass
class _Task:
    idx: int
    path: str


def _done_path(cfg: IngestConfig, idx: int) -> str:
    return os.path.join(cfg.output, ".ingest", cfg.source, f"{idx:05d}.json")


def _write_atomic(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _SkipLog:
    """Counts skips by reason; logs the first few of each reason per file."""

    def __init__(self, stats: IngestStats, per_reason: int = 5):
        self.stats, self.per_reason, self.seen = stats, per_reason, Counter()

    def skip(self, s: Skip, table: Optional[dict] = None) -> None:
        table = self.stats.skipped if table is None else table
        table[s.reason] = table.get(s.reason, 0) + max(s.samples, 1)
        self.seen[s.reason] += 1
        if self.seen[s.reason] <= self.per_reason:
            log.warning("skipped (%s) at %s: %s", s.reason, s.where, s.detail[:200])


def run_task(task: _Task, cfg: IngestConfig, reader: Reader, tok: Optional[Tokenizer] = None,
             progress: Optional[Callable[[int, int], None]] = None) -> IngestStats:
    """Ingest one input file into its own shards, then write its done-file. Never raises on data."""
    t0 = time.time()
    tok = tok or Tokenizer(cfg.tokenizer)
    stats = IngestStats()
    slog = _SkipLog(stats)
    writers = {sp: ShardWriter(cfg.output, cfg.source, sp, cfg.shard_samples, tag=f"{task.idx:05d}")
               for sp in ("train", "val")}
    seen_keys: set[str] = set()
    try:
        for item in reader(task.path, cfg):
            if isinstance(item, Skip):
                slog.skip(item)
                if progress:
                    progress(item.samples, 0)
                continue
            key = clean_key(item.key)
            if key in seen_keys:
                slog.skip(Skip("duplicate_key", item.where, key))
                continue
            images, remap, bad = [], {}, []  # remap: image index in the input -> in the output
            for k, data in enumerate(item.images):
                try:
                    if isinstance(data, BadImage):  # a reader could not even get the bytes
                        raise data
                    jpg, re_enc = prepare_image(data, cfg)
                except BadImage as e:
                    bad.append(e)
                    continue
                remap[k] = len(images)
                images.append(jpg)
                stats.reencoded += int(re_enc)
            if bad and not item.drop_bad_images:
                slog.skip(Skip(bad[0].reason, item.where, bad[0].detail))
                if progress:
                    progress(1, 0)
                continue
            for e in bad:  # interleaved: the document stays, the image goes
                slog.skip(Skip(e.reason, item.where, e.detail), table=stats.dropped_images)
            parts, n_text = [], 0
            for p in item.parts:
                if isinstance(p, int):
                    if p in remap:
                        parts.append(remap[p])
                elif p:
                    ids = tok.encode(p)
                    if ids:
                        parts.append(ids)
                        n_text += len(ids)
            if not parts:
                slog.skip(Skip("empty_document", item.where, "no text and no usable image"))
                continue
            if item.needs_text and not n_text:
                slog.skip(Skip("empty_caption", item.where, "the text tokenizes to nothing"))
                continue
            seen_keys.add(key)
            writers[split_of(key, cfg.val_fraction)].write(key, parts, images)
            stats.samples += 1
            stats.images += len(images)
            stats.text_tokens += n_text
            if progress:
                progress(1, len(images))
    finally:
        for w in writers.values():
            w.close()
    stats.seconds = time.time() - t0
    infos = [asdict(i) for w in writers.values() for i in w.infos]
    _write_atomic(_done_path(cfg, task.idx), {"input": os.path.abspath(task.path), "shards": infos,
                                              "stats": asdict(stats)})
    return stats


def _pool_task(args) -> tuple[int, Optional[IngestStats], str]:
    task, cfg, reader = args
    try:
        return task.idx, run_task(task, cfg, reader), ""
    except Exception as e:  # an input we cannot even open: reported, retried by the next run
        return task.idx, None, f"{type(e).__name__}: {e}"


def run_ingest(inputs: list[str], cfg: IngestConfig, reader: Reader) -> IngestStats:
    """Ingest every input file (skipping completed ones), then write OUTPUT/manifest.json."""
    cfg.validate()
    if not inputs:
        raise ValueError("run_ingest: no input files")
    os.makedirs(cfg.output, exist_ok=True)
    _install_tokenizer(cfg)
    tasks = [_Task(i, p) for i, p in enumerate(sorted(inputs))]
    total, todo = IngestStats(), []
    for t in tasks:
        done = _load_done(cfg, t)
        if done is None:
            todo.append(t)
        else:
            total.add(IngestStats(**done["stats"]))
    if len(todo) < len(tasks):
        log.info("resuming: %d of %d inputs already done", len(tasks) - len(todo), len(tasks))
    bar = _bar(cfg, len(todo))
    failed: dict[str, str] = {}
    if cfg.workers == 1:
        tok = Tokenizer(cfg.tokenizer)
        for t in todo:
            try:
                total.add(run_task(t, cfg, reader, tok, progress=bar.sample))
            except Exception as e:
                failed[t.path] = f"{type(e).__name__}: {e}"
            bar.file_done()
    else:
        ctx = mp.get_context("spawn")  # no inherited threads/locks from the parent
        with ctx.Pool(cfg.workers) as pool:
            for idx, st, err in pool.imap_unordered(_pool_task, [(t, cfg, reader) for t in todo]):
                if st is None:
                    failed[tasks[idx].path] = err
                else:
                    total.add(st)
                    bar.sample(st.samples + sum(st.skipped.values()), st.images)
                bar.file_done()
    bar.close()
    for path, err in failed.items():
        log.error("input %s failed (%s); it is not in the manifest; rerun to retry", path, err)
        total.skipped["unreadable_input"] = total.skipped.get("unreadable_input", 0) + 1
    _write_merged_manifest(cfg, tasks)
    return total


def _load_done(cfg: IngestConfig, t: _Task) -> Optional[dict]:
    path = _done_path(cfg, t.idx)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        done = json.load(f)
    if done["input"] != os.path.abspath(t.path):
        raise ValueError(f"run_ingest: {path} records input {done['input']} but input #{t.idx} is now "
                         f"{os.path.abspath(t.path)}: the input list changed since the interrupted run; "
                         f"use the same inputs or a fresh --output")
    return done


def _install_tokenizer(cfg: IngestConfig) -> None:
    dest = os.path.join(cfg.output, "tokenizer.model")
    if os.path.isfile(dest):
        with open(dest, "rb") as a, open(cfg.tokenizer, "rb") as b:
            if a.read() != b.read():
                raise ValueError(f"run_ingest: {dest} differs from --tokenizer {cfg.tokenizer}; all sources "
                                 f"of one output directory must share a tokenizer")
    else:
        shutil.copyfile(cfg.tokenizer, dest)


def _write_merged_manifest(cfg: IngestConfig, tasks: list[_Task]) -> str:
    path = os.path.join(cfg.output, "manifest.json")
    sources, shards = [], []
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        sources = [s for s in old["sources"]]
        shards = [ShardInfo(**s) for s in old["shards"] if s["source"] != cfg.source]
    if cfg.source not in sources:
        sources.append(cfg.source)
    for t in tasks:
        done_file = _done_path(cfg, t.idx)
        if os.path.isfile(done_file):
            with open(done_file) as f:
                # Empty shards (e.g. a val split that got no sample) are left out.
                shards.extend(ShardInfo(**s) for s in json.load(f)["shards"] if s["samples"] > 0)
    return write_manifest(cfg.output, "tokenizer.model", sources, shards)


class _Bar:
    """tqdm over samples with images/s in the postfix (no-op when progress is off)."""

    def __init__(self, cfg: IngestConfig, n_files: int):
        self.t0, self.images, self.files, self.n_files = time.time(), 0, 0, n_files
        self.tq = None
        if cfg.progress:
            from tqdm import tqdm
            self.tq = tqdm(unit="sample", desc=f"ingest {cfg.source}", smoothing=0.05)

    def sample(self, n: int, n_images: int) -> None:
        self.images += n_images
        if self.tq is not None:
            self.tq.update(n)
            if self.tq.n % 256 < max(n, 1):
                self.tq.set_postfix(img_s=f"{self.images / max(time.time() - self.t0, 1e-9):.0f}",
                                    files=f"{self.files}/{self.n_files}", refresh=False)

    def file_done(self) -> None:
        self.files += 1
        if self.tq is not None:
            self.tq.set_postfix(img_s=f"{self.images / max(time.time() - self.t0, 1e-9):.0f}",
                                files=f"{self.files}/{self.n_files}")

    def close(self) -> None:
        if self.tq is not None:
            self.tq.close()


def _bar(cfg: IngestConfig, n_files: int) -> _Bar:
    return _Bar(cfg, n_files)
