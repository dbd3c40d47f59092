"""Ingest driver shared by the three formats: images at ingest, skip accounting, resumable tasks.

The format readers (captions.py, interleaved.py, text.py) turn one input file into a stream of
`RawDoc` (a file-local key, parts, raw image bytes) or `Skip` (a bad sample, with its reason and
place). This module does the rest, identically for every format:

  * keys: qualified with the input's path relative to the common folder of all inputs
    (`laion/a/00000.tar` and `laion/b/00000.tar` never collide; inputs of one folder keep the
    readable `{file}_{key}`), made shard-safe by `clean_key`; a key seen twice in a run's input
    (adjacent or not, kept or skipped the first time) is skipped and counted as `duplicate_key`;
  * images: `image_prep.prepare_image` (header checks, EXIF orientation, draft decode, resize,
    colour modes to 8-bit RGB, JPEG);
  * text tokenized (no BOS/EOS; the loader adds them); captions longer than `max_caption_tokens`
    truncated, text and interleaved documents longer than `max_doc_tokens` split at paragraph
    boundaries (lengths.py), both counted;
  * train/val by a stable hash of the key, with a minimum held-out size per source (heldout.py);
    the pieces of a split document stay in their document's split;
  * one task per input file: its shards are named after the file's index (`{split}-{idx}-{n}.tar`)
    and a small done-file `OUT/.ingest/{source}/{idx}.json` is written atomically after its last
    shard is closed. A restarted run skips inputs whose done-file exists (completed shards are not
    redone) and redoes the others from scratch (their shard names are the same, so partial tars
    are overwritten). The manifest is (re)written from the done-files at the end, merged with the
    other sources already in OUT/manifest.json.

Nothing about the data stops the run: every bad sample, image or file is counted by reason
(accounting.py: the counts add up to the samples read), logged (first few per reason and file,
with the place), and skipped. Whether the result is good enough is judged at the end
(`accounting.problems`, used by tools/prepare_data.py to exit non-zero).

Run it through `python tools/prepare_data.py captions|interleaved|text --input ... --output DIR
--tokenizer TOK.model [--workers N]`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Iterator, Optional, Union

from pretrain.data.ingest.accounting import IngestStats, SkipLog
from pretrain.data.ingest.heldout import heldout_fraction
from pretrain.data.ingest.image_prep import BadImage, prepare_image
from pretrain.data.ingest.io import InputError, Skip, input_stem  # Skip re-exported: readers take it from here
from pretrain.data.ingest.lengths import split_document
from pretrain.data.shards import ShardInfo, ShardWriter, split_of, write_manifest
from pretrain.data.tokenizer import Tokenizer

__all__ = ["IngestConfig", "RawDoc", "Skip", "BadImage", "IngestStats", "prepare_image", "clean_key",
           "run_task", "run_ingest"]

log = logging.getLogger("pretrain.data.ingest")


@dataclass
class IngestConfig:
    # Output directory (manifest.json, tokenizer.model, {source}/{split}-*.tar, .ingest/).
    output: str
    # SentencePiece model; copied to OUTPUT/tokenizer.model (must equal the one already there).
    tokenizer: str
    # Source name written into the shards and the manifest (caption, interleaved, text, ...).
    source: str
    # Fraction of samples (by stable hash of their key) that go to the val split (0: none).
    val_fraction: float = 0.01
    # ... but at least this many documents of the source (at most half of it; see heldout.py).
    val_min_docs: int = 200
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
    # Captions longer than this many tokens are truncated (counted).
    max_caption_tokens: int = 512
    # Text / interleaved documents costing more than this many tokens are split at paragraph
    # boundaries into several documents (counted); an image costs `image_tokens`.
    max_doc_tokens: int = 32768
    image_tokens: int = 256
    # Processes, one input file at a time each (1: everything in this process).
    workers: int = 1
    # Column / field names (captions and interleaved parquet/JSONL; text JSONL).
    image_column: str = "image"
    caption_column: str = "caption"
    text_field: str = "text"
    # Local image paths in records resolve under this folder ("": the input file's own folder);
    # paths leading anywhere else are refused (image_refs.py).
    image_root: str = ""
    # Download cache of `--download` ("": image URLs are not fetched, counted as remote_image).
    download_cache: str = ""
    # Show a progress bar.
    progress: bool = True

    def validate(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"IngestConfig.val_fraction: must be in [0, 1), got {self.val_fraction}")
        if self.val_min_docs < 0:
            raise ValueError(f"IngestConfig.val_min_docs: must be >= 0, got {self.val_min_docs}")
        if self.shard_samples < 1:
            raise ValueError(f"IngestConfig.shard_samples: must be >= 1, got {self.shard_samples}")
        if self.image_size < 1 or self.min_image_size < 1:
            raise ValueError("IngestConfig.image_size/min_image_size: must be >= 1")
        if self.max_caption_tokens < 1 or self.max_doc_tokens < 1 or self.image_tokens < 0:
            raise ValueError("IngestConfig.max_caption_tokens/max_doc_tokens: must be >= 1 "
                             "(image_tokens >= 0)")
        if self.workers < 1:
            raise ValueError(f"IngestConfig.workers: must be >= 1, got {self.workers}")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.source):
            raise ValueError(f"IngestConfig.source: {self.source!r} must be [A-Za-z0-9_-]+")
        if not os.path.isfile(self.tokenizer):
            raise ValueError(f"IngestConfig.tokenizer: file not found: {self.tokenizer}")
        if self.image_root and not os.path.isdir(self.image_root):
            raise ValueError(f"IngestConfig.image_root: not a directory: {self.image_root}")


@dataclass
class RawDoc:
    """One sample as a reader found it. parts: str (text), a list of token ids (text a reader
    tokenized itself: the chat template), or int k (image k of `images`)."""
    key: str  # unique within its input file; the driver qualifies it with the file's name
    parts: list
    images: list  # bytes, or a BadImage when the reader could not get them (missing file, ...)
    where: str  # file:line or tar:member, for log messages
    drop_bad_images: bool = False  # True: a bad image is dropped and the doc kept (interleaved)
    needs_text: bool = False  # True: a doc without text is skipped (caption pairs, text docs)
    is_caption: bool = False  # True: truncated at max_caption_tokens instead of split


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
    name: str = ""  # the input's path relative to the common folder of all inputs, no extension

    def key(self, local: str) -> str:
        return clean_key(f"{self.name or input_stem(self.path)}_{local}")


def task_names(paths: list[str]) -> list[str]:
    """Input paths -> names unique across folders: relative to the inputs' common folder."""
    absolute = [os.path.abspath(p) for p in paths]
    common = os.path.dirname(absolute[0]) if len(absolute) == 1 else os.path.commonpath(absolute)
    if len(absolute) > 1 and common in absolute:  # the same file given twice
        common = os.path.dirname(common)
    names = [os.path.join(os.path.dirname(os.path.relpath(p, common)), input_stem(p)) for p in absolute]
    taken = [n for n in names if names.count(n) > 1]  # a.tar next to a.tar.gz: keep the extension
    return [os.path.relpath(p, common) if n in taken else n for p, n in zip(absolute, names)]


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


def _images_of(item: RawDoc, cfg: IngestConfig, stats: IngestStats) -> tuple[list, dict, list]:
    """(prepared JPEGs, input index -> output index, BadImage list)."""
    images, remap, bad = [], {}, []
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
    return images, remap, bad


def _pieces(item: RawDoc, remap: dict, tok: Tokenizer, cfg: IngestConfig,
            stats: IngestStats) -> tuple[list[list], int]:
    """The document's parts as one or more pieces (token lists / output image indices)."""
    parts, n_text = [], 0
    for p in item.parts:
        if isinstance(p, int):
            if p in remap:
                parts.append(remap[p])
        elif p:
            ids = p if isinstance(p, list) else tok.encode(p)  # a list: ids already (chat template)
            if ids:
                parts.append(ids)
                n_text += len(ids)
    if item.is_caption:
        if n_text > cfg.max_caption_tokens:
            parts = [p if isinstance(p, int) else p[:cfg.max_caption_tokens] for p in parts]
            stats.truncated_captions += 1
        return [parts], n_text
    cost = n_text + cfg.image_tokens * sum(isinstance(p, int) for p in parts)
    if cost <= cfg.max_doc_tokens:
        return [parts], n_text
    raw = [remap[p] if isinstance(p, int) else p for p in item.parts if not isinstance(p, int) or p in remap]
    pieces = split_document(raw, tok, cfg.max_doc_tokens, cfg.image_tokens)
    stats.split_documents += 1
    stats.split_added += len(pieces) - 1
    return pieces, n_text


def run_task(task: _Task, cfg: IngestConfig, reader: Reader, tok: Optional[Tokenizer] = None,
             progress: Optional[Callable[[int, int], None]] = None) -> IngestStats:
    """Ingest one input file into its own shards, then write its done-file. Never raises on data."""
    t0 = time.time()
    tok = tok or Tokenizer(cfg.tokenizer)
    stats = IngestStats()
    slog = SkipLog(stats)
    writers = {sp: ShardWriter(cfg.output, cfg.source, sp, cfg.shard_samples, tag=f"{task.idx:05d}")
               for sp in ("train", "val")}
    seen_keys: set[str] = set()

    def skipped(s: Skip, table: Optional[dict] = None) -> None:
        slog.skip(s, table)
        if progress and table is None:
            progress(s.samples, 0)
    try:
        items = reader(task.path, cfg) if os.path.getsize(task.path) else \
            iter([Skip("empty_input", os.path.basename(task.path), "zero-byte file", samples=0)])
        for item in items:
            if isinstance(item, Skip):
                stats.read += item.samples
                skipped(item)
                continue
            stats.read += 1
            key = task.key(item.key)
            if key in seen_keys:
                skipped(Skip("duplicate_key", item.where, key))
                continue
            seen_keys.add(key)
            images, remap, bad = _images_of(item, cfg, stats)
            if bad and not item.drop_bad_images:
                skipped(Skip(bad[0].reason, item.where, bad[0].detail))
                continue
            for e in bad:  # interleaved: the document stays, the image goes
                slog.skip(Skip(e.reason, item.where, e.detail), table=stats.dropped_images)
            pieces, n_text = _pieces(item, remap, tok, cfg, stats)
            if not pieces[0]:
                skipped(Skip("empty_document", item.where, "no text and no usable image"))
                continue
            if item.needs_text and not n_text:
                skipped(Skip("empty_caption" if item.is_caption else "empty_text", item.where,
                             "the text tokenizes to nothing"))
                continue
            split = split_of(key, cfg.val_fraction)
            for i, parts in enumerate(pieces):
                used = sorted(p for p in parts if isinstance(p, int))  # a piece's own images, renumbered
                local = {old: new for new, old in enumerate(used)}
                writers[split].write(key if i == 0 else clean_key(f"{key}-part{i}"),
                                     [local[p] if isinstance(p, int) else p for p in parts],
                                     [images[j] for j in used])
                stats.samples += 1
                stats.val_samples += split == "val"
            stats.images += len(images)
            stats.text_tokens += sum(len(p) for piece in pieces for p in piece if isinstance(p, list))
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


def _source_keys(tasks: list[_Task], cfg: IngestConfig, reader: Reader) -> Iterator[str]:
    """The document keys of the inputs, in order (for the held-out count; nothing is decoded)."""
    for t in tasks:
        try:
            if os.path.getsize(t.path):
                for item in reader(t.path, cfg):
                    if isinstance(item, RawDoc):
                        yield t.key(item.key)
        except InputError:  # wrong columns: the user must hear it now, not after the count
            raise
        except Exception as e:  # unreadable: the ingest proper reports it
            log.warning("counting documents: %s unreadable (%s)", t.path, e)


def run_ingest(inputs: list[str], cfg: IngestConfig, reader: Reader) -> IngestStats:
    """Ingest every input file (skipping completed ones), then write OUTPUT/manifest.json."""
    cfg.validate()
    if not inputs:
        raise ValueError("run_ingest: no input files")
    os.makedirs(cfg.output, exist_ok=True)
    _install_tokenizer(cfg)
    paths = sorted(inputs)
    tasks = [_Task(i, p, n) for i, (p, n) in enumerate(zip(paths, task_names(paths)))]
    heldout = heldout_fraction(cfg, lambda: _source_keys(tasks, cfg, reader))
    cfg = replace(cfg, val_fraction=heldout["effective_val_fraction"])
    total, todo = IngestStats(), []
    for t in tasks:
        done = _load_done(cfg, t)
        if done is None:
            todo.append(t)
        else:
            total.add(IngestStats.from_dict(done["stats"]))
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
        total.events["unreadable_input"] = total.events.get("unreadable_input", 0) + 1
        total.examples.setdefault("unreadable_input", f"{path}: {err}")
    total.failed_inputs.update(failed)
    _write_merged_manifest(cfg, tasks)
    total.heldout = heldout
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
