"""Offline packing: run the online packer once, ahead of training, and store its rows.

    python tools/pack_shards.py --input data/demo --output data/demo_rows --seq-len 256 \
        [--config pretrain/configs/demo.yaml] [--workers 2] [--epochs 1] [--rows-per-shard 1000]

One code path: the rows are those of the online loader itself. `plan_source_rows` builds a
`TrainLoader` (rank 0 of 1) and calls its `next_row(s)`: the same document order (a function of
(seed, source, epoch, index)), pieces (image spans atomic), best-fit packer and caption-tail
filling. Only the read is swapped, through the stream's public seam `SourceStream.read_sample`:
images are placeholder tensors [n_patches, 0] (packing needs their length only), tagged with
their JPEG's location and with the key (stream, epoch, index, image) the online loader draws
their crop and flip from. The row shard stores the JPEG and that
key, so the row loader reproduces the online patches bit for bit, and the augmentation still
runs at load time.

Rows per source are planned independently (online, each source has its own packer; the tail
filler, when on for one source, serves that source only). A source is packed for `epochs` passes
over its train documents (the whole data set); then the pieces still buffered are flushed into
final rows, so with epochs=1 every train document lands in exactly one row. Every row before
that flush is the online loader's row.

Pipeline:
  1. scan every input train shard (worker pool): unreadable ones are reported, counted in the
     manifest's `errors` and left out; the run stops only if a packed source loses all shards;
  2. plan rows source by source in this process (json only, no pixels; best fit is sequential);
  3. while planning, worker processes fetch the JPEGs and write row shards (tar to .tmp, then
     rename), one task per output shard, with a bounded number of shards in flight.
Restart is idempotent: the plan is deterministic, an output shard that exists is complete and is
skipped, and OUTPUT/pack_config.json refuses to mix shards of a different packing.
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import shutil
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Iterator, Optional

import numpy as np
import torch

from pretrain.data.config import DataConfig
from pretrain.data.loader import SourceStream, TrainLoader
from pretrain.data.packing import Piece
from pretrain.data.offline.rows import (PackedRow, RowManifest, RowPiece, RowShardInfo, RowShardWriter, TarIndex,
                                row_shard_info_of, write_row_manifest)
from pretrain.data.shards import Manifest, RawSample, load_manifest, write_manifest

try:  # a progress bar when tqdm is installed (it is in requirements.txt); plain otherwise
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    def tqdm(it=None, **_):
        return it


@dataclass
class PackReport:
    """What a pack run did (also printed by tools/pack_shards.py)."""
    output: str
    rows: dict[str, int] = field(default_factory=dict)  # rows per source
    shards_written: int = 0
    shards_skipped: int = 0  # already complete from an earlier run
    shards_failed: list[str] = field(default_factory=list)  # "path: error"
    unreadable_inputs: list[str] = field(default_factory=list)  # "path: error"
    seconds: float = 0.0


# -- planning (the online packer, images as placeholders) ---------------------------------------
class _EndOfPlan(Exception):
    """Raised by a planned stream instead of reading past its last planned epoch."""


def _placeholder(n_patches: int, ref: tuple) -> torch.Tensor:
    """An image as the packer sees it: a float tensor [n_patches, 0] (a length, no pixels),
    tagged with where its JPEG is and the key its augmentation is drawn from."""
    t = torch.empty(n_patches, 0)
    t.image_ref = ref  # (shard path, doc key, image k, image key for rows.PackedRow.image_keys)
    return t


def _lengths_only(stream: SourceStream, n_patches: int, epochs: Optional[int] = None) -> None:
    """Make `stream` read placeholders instead of JPEG bytes (see `_placeholder`); with `epochs`,
    reading a document of epoch `epochs` or later ends the plan (raises _EndOfPlan).

    Only the read is swapped: document order, items, pieces, tail filling and the packer are the
    online ones, and the online `_doc_items` passes tensors through undecoded. The online loader
    augments image k of the document at (epoch, index) of a stream with rng(seed, stream_id,
    epoch, index, k); the tag records that key (stream_id as offset from the source index, so the
    row loader can rebuild it from source names).
    """
    def read(epoch: int, index: int) -> RawSample:
        if epochs is not None and epoch >= epochs:  # positions arrive normalised (index < per_rank)
            raise _EndOfPlan
        shard, key = stream.order(epoch)[index]
        doc = stream.reader(shard).read_json(key)  # json only: packing needs no pixels
        n_img = max([p + 1 for p in doc.get("parts", []) if isinstance(p, int)] + [0])
        path, off = stream.paths[shard], stream.stream_id - stream.source_idx
        images = [_placeholder(n_patches, (path, key, k, [stream.source, off, epoch, index, k]))
                  for k in range(n_img)]
        return RawSample(key=key, doc=doc, images=images)

    stream.read_sample = read


@dataclass
class PlannedRow:
    """A row as planned: its final layout, with image references instead of image bytes."""
    row: PackedRow  # images empty; image_keys filled
    image_refs: list[tuple[str, str, int]]  # per image k of the row: (shard path, doc key, image index)


def _text_run(it) -> list[int]:
    """A text item of a piece (int or int array) as a list of ints."""
    return [int(it)] if isinstance(it, (int, np.integer)) else np.asarray(it, dtype=np.int64).tolist()


def _flat_ref(ref) -> list:
    """The online piece ref as flat JSON (debugging and tests only; layout never reads it):
    (epoch, index, piece[, cut offset]) for documents, ("fill", (epoch, index), offset) for a
    tail-fill fragment, kept as ["fill", epoch, index, offset]."""
    out: list = []
    for x in ref:
        if isinstance(x, (tuple, list)):
            out.extend(int(y) for y in x)
        else:
            out.append(x if isinstance(x, str) else int(x))
    return out


def planned_row(pieces: list[Piece], keys: list[str], row_source: str, sources: list[str],
                seq_len: int) -> PlannedRow:
    """Online pieces (placeholder images) -> the stored layout: text runs as id lists, images as
    slots of the row with their JPEG reference and augmentation key."""
    refs: list[tuple[str, str, int]] = []
    image_keys: list[list] = []
    out: list[RowPiece] = []
    for p, key in zip(pieces, keys):
        parts: list = []
        for it in p.items:
            if isinstance(it, torch.Tensor) and it.is_floating_point():
                path, doc_key, k, aug = it.image_ref
                parts.append(len(refs))
                refs.append((path, doc_key, k))
                image_keys.append(list(aug))
            elif parts and isinstance(parts[-1], list):
                parts[-1].extend(_text_run(it))
            else:
                parts.append(_text_run(it))
        out.append(RowPiece(source=sources[p.source_idx], key=key, ref=_flat_ref(p.ref), length=p.length,
                            parts=parts))
    row = PackedRow(source=row_source, pieces=out, images=[], image_keys=image_keys, seq_len=seq_len)
    return PlannedRow(row, refs)


def plan_source_rows(cfg: DataConfig, source_idx: int, *, epochs: int = 1,
                     max_rows: Optional[int] = None, rank: int = 0,
                     world_size: int = 1) -> Iterator[PlannedRow]:
    """Yield the rows of one source in the order the online loader (rank `rank` of `world_size`)
    emits them.

    Rows come from `TrainLoader.next_row` itself (best fit, and tail filling where the config
    asks for it), with images as placeholders. The source's stream refuses to read past epoch
    `epochs - 1`; the pieces still buffered then are flushed into final rows (so every train
    document is in exactly one row per epoch; flushed rows get no tail filling, they are the
    last few dozen). Every row before the flush is an online row.
    """
    cfg = dataclasses.replace(cfg, num_workers=0)
    if len(cfg.fill_rows_of) > 1:
        # One fill cursor serves every filled source online, so what a row of one of them gets
        # depends on the mixture's interleaving of all of them: not a per-source plan.
        raise ValueError(f"plan_source_rows: offline packing supports tail filling of one source, "
                         f"got fill_rows_of={cfg.fill_rows_of}")
    loader = TrainLoader(cfg, rank=rank, world_size=world_size, micro_batch_size=1)
    for st in _streams_of(loader):  # the source's own stream stops after `epochs`; the filler does not
        _lengths_only(st, cfg.n_patches, epochs if st is loader.streams[source_idx] else None)
    packer = loader.packers[source_idx]
    name, n = cfg.sources[source_idx], 0

    def out(row: list[Piece]) -> PlannedRow:
        # Keys now: the stream caches the order of two epochs only; a piece may wait longer.
        return planned_row(row, [loader.piece_key(p) for p in row], name, cfg.sources, cfg.seq_len)
    try:
        while max_rows is None or n < max_rows:
            try:
                row = loader.next_row(source_idx)
            except _EndOfPlan:
                break
            yield out(row)
            n += 1
        while packer.buffer and (max_rows is None or n < max_rows):  # flush: no more reading
            yield out(packer.pop_row())
            n += 1
    finally:
        loader.close()


def _streams_of(loader: TrainLoader) -> list[SourceStream]:
    """Every SourceStream the loader reads from: its sources' and the tail filler's."""
    return list(loader.streams.values()) + ([loader.filler.stream] if loader.filler is not None else [])


# -- writing (worker processes) -----------------------------------------------------------------
@dataclass
class _ShardJob:
    path: str  # absolute output path
    info: RowShardInfo
    first_row: int  # index of the shard's first row within its source (row keys are global)
    rows: list[PlannedRow]


def _write_shard(job: _ShardJob) -> tuple[str, Optional[RowShardInfo], Optional[str]]:
    """Worker: fetch the JPEGs and write one row shard; returns (path, info, error).
    Never raises: a bad input sample fails this shard only, and the caller counts it."""
    readers: dict[str, TarIndex] = {}
    writer = None
    try:
        writer = RowShardWriter(job.path, dataclasses.replace(job.info), job.rows[0].row.seq_len)
        for i, pr in enumerate(job.rows):
            images = []
            for path, key, k in pr.image_refs:
                if path not in readers:
                    readers[path] = TarIndex(path)
                images.append(readers[path].read_member(key, f"img{k}.jpg"))
            pr.row.images = images
            writer.write(f"{job.first_row + i:09d}", pr.row)
        writer.close()
        return job.path, writer.info, None
    except Exception as e:
        if writer is not None:
            writer.abort()
        return job.path, None, f"{type(e).__name__}: {e}"
    finally:
        for r in readers.values():
            r.close()


# -- scanning inputs ----------------------------------------------------------------------------
def _scan_shard(args: tuple[str, int]) -> Optional[str]:
    """Worker: None if the shard holds the manifest's sample count, every json parses and every
    image is present; else the error. (A truncated tar often still opens: the count catches it.)"""
    path, samples = args
    try:
        r = TarIndex(path)
        try:
            if len(r.keys) != samples:
                return f"holds {len(r.keys)} samples, the manifest says {samples} (truncated?)"
            for key in r.keys:
                doc = r.read_json(key)
                for p in doc.get("parts", []):
                    if isinstance(p, int) and f"img{p}.jpg" not in r.members[key]:
                        return f"sample {key} lacks img{p}.jpg"
        finally:
            r.close()
        return None
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def _pool(workers: int):
    # fork: workers inherit the imported modules (fast start); data go through arguments only.
    ctx = mp.get_context("fork")
    return ctx.Pool(workers) if workers > 1 else None


def _map(pool, fn, items, desc: str, progress: bool):
    it = pool.imap(fn, items) if pool is not None else map(fn, items)
    return list(tqdm(it, total=len(items), desc=desc, disable=not progress, unit="task"))


def stage_inputs(inputs: list[str], output: str, sources: list[str], workers: int = 1,
                 progress: bool = True) -> tuple[str, list[str], str]:
    """Merge the train shards of `inputs` into OUTPUT/_inputs/manifest.json (absolute paths),
    leaving out unreadable shards. Returns (staging root, errors, tokenizer path)."""
    manifests: list[Manifest] = [load_manifest(d) for d in inputs]
    tok = manifests[0].tokenizer_path
    for m in manifests[1:]:
        with open(tok, "rb") as a, open(m.tokenizer_path, "rb") as b:
            if a.read() != b.read():
                raise ValueError(f"pack_shards: inputs use different tokenizers ({tok} vs {m.tokenizer_path}); "
                                 f"token ids would not mean the same thing")
    shards = [(m, s) for m in manifests for s in m.shards if s.split == "train" and s.source in sources]
    paths = [m.abspath(s) for m, s in shards]
    pool = _pool(workers)
    results = _map(pool, _scan_shard, [(p, s.samples) for p, (_, s) in zip(paths, shards)], "scan inputs", progress)
    if pool is not None:
        pool.close()
    errors, good = [], []
    for (m, s), path, err in zip(shards, paths, results):
        if err is None:
            good.append(dataclasses.replace(s, path=path))
        else:
            errors.append(f"{path}: {err}")
            print(f"pack_shards: ERROR: unreadable input shard {path} ({err}); skipped")
    stage = os.path.join(output, "_inputs")
    os.makedirs(stage, exist_ok=True)
    write_manifest(stage, tok, sources, good)
    return stage, errors, tok


# DataConfig fields that do not change which rows are packed (load-time or location settings).
_NOT_PACKING = {"root", "tokenizer", "num_workers", "augment", "crop_scale_min", "crop_scale_max",
                "hflip_prob", "format", "rows_root"}


def _fingerprint(cfg: DataConfig, inputs: list[str], epochs: int, max_rows: Optional[int],
                 rows_per_shard: int, world_size: int = 1) -> dict:
    """Everything the rows depend on; every other DataConfig field counts (so a packing option
    added later to DataConfig is covered without touching this file)."""
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_PACKING}
    return {"inputs": [os.path.abspath(d) for d in inputs], **fields, "epochs": epochs, "max_rows": max_rows,
            "rows_per_shard": rows_per_shard, "world_size": world_size}


def pack_shards(inputs: list[str], output: str, cfg: DataConfig, *, epochs: int = 1,
                max_rows: Optional[int] = None, rows_per_shard: int = 1000, workers: int = 1,
                progress: bool = True, world_size: int = 1) -> PackReport:
    """Pack the train documents of `inputs` (ingest output dirs) into row shards under `output`.

    cfg supplies sources, weights (a source of weight 0 is not packed), seed, seq_len, image and
    patch size, pack_buffer and tail filling -- the fields the online loader packs with; cfg.root
    is ignored (the inputs replace it). max_rows caps the rows per source (tests, samples).
    world_size: pack the rows each of that many data-parallel ranks would pack online (rank 0's
    rows first, then rank 1's, ...; the manifest records `rank_rows` per source), so that
    training from the rows on that many ranks reproduces the online path batch for batch. Any
    other world size still reads equal, disjoint blocks of the same rows.
    Planning runs in this process (it is sequential by nature: best fit carries a buffer);
    `workers` processes fetch the JPEGs and write the shards while it plans.
    """
    t0 = time.time()
    if rows_per_shard < 1:
        raise ValueError(f"pack_shards: rows_per_shard must be >= 1, got {rows_per_shard}")
    if epochs < 1:
        raise ValueError(f"pack_shards: epochs must be >= 1, got {epochs}")
    os.makedirs(output, exist_ok=True)
    if world_size < 1:
        raise ValueError(f"pack_shards: world_size must be >= 1, got {world_size}")
    fp = _fingerprint(cfg, inputs, epochs, max_rows, rows_per_shard, world_size)
    fp_path = os.path.join(output, "pack_config.json")
    if os.path.exists(fp_path):
        with open(fp_path) as f:
            old = json.load(f)
        if old != fp:
            diff = {k: (old.get(k), v) for k, v in fp.items() if old.get(k) != v}
            raise ValueError(f"pack_shards: {output} holds rows of a different packing ({diff}); "
                             f"use a new output directory or delete it")
    else:
        with open(fp_path, "w") as f:
            json.dump(fp, f, indent=1)
    weights = cfg.normalized_weights()
    packed = [s for s in range(len(cfg.sources)) if weights[s] > 0]
    stage, errors, tok = stage_inputs(inputs, output, list(cfg.sources), workers, progress)
    report = PackReport(output=output, unreadable_inputs=errors)
    pcfg = dataclasses.replace(cfg, root=stage, tokenizer=tok, num_workers=0)
    pcfg.validate()
    staged = load_manifest(stage)
    for s in packed:
        if not staged.select(cfg.sources[s], "train"):
            raise ValueError(f"pack_shards: no readable train shards left for source {cfg.sources[s]!r} "
                             f"({len(errors)} unreadable inputs); cannot pack it")

    infos: list[RowShardInfo] = []
    pool = _pool(workers)
    inflight: deque = deque()  # bounded: planned rows wait in memory only until written

    def collect(res) -> None:
        path, info, err = res
        if err is None:
            infos.append(info)
            report.shards_written += 1
        else:
            report.shards_failed.append(f"{path}: {err}")
            print(f"pack_shards: ERROR: could not write {path} ({err}); left out of the manifest")

    def submit(job: _ShardJob) -> None:
        if os.path.exists(job.path):  # complete (written atomically) by an earlier run
            report.shards_skipped += 1
            infos.append(row_shard_info_of(job.path, job.info.path, "train", cfg.seq_len))
            return
        if pool is None:
            collect(_write_shard(job))
            return
        inflight.append(pool.apply_async(_write_shard, (job,)))
        while len(inflight) > 2 * workers:
            collect(inflight.popleft().get())

    bar = tqdm(desc="pack rows", unit="row", disable=not progress)
    rank_rows: dict[str, list[int]] = {}
    for s in packed:
        src = cfg.sources[s]
        n, chunk = 0, []
        rank_rows[src] = []
        for r in range(world_size):
            n_before = n
            for prow in plan_source_rows(pcfg, s, epochs=epochs, max_rows=max_rows, rank=r,
                                         world_size=world_size):
                chunk.append(prow)
                n += 1
                bar.update(1)
                if len(chunk) == rows_per_shard:
                    submit(_job(output, src, n - len(chunk), chunk, rows_per_shard))
                    chunk = []
            rank_rows[src].append(n - n_before)
        if chunk:
            submit(_job(output, src, n - len(chunk), chunk, rows_per_shard))
        report.rows[src] = n
    while inflight:
        collect(inflight.popleft().get())
    bar.close()
    if pool is not None:
        pool.close()
        pool.join()

    per_source = {}
    for src in report.rows:
        sel = [i for i in infos if i.source == src]
        rows_, tokens, pad = sum(i.rows for i in sel), sum(i.tokens for i in sel), sum(i.padding for i in sel)
        per_source[src] = {"rows": rows_, "tokens": tokens, "padding": pad, "images": sum(i.images for i in sel),
                           "pieces": sum(i.pieces for i in sel),
                           "padding_fraction": round(pad / max(1, rows_ * cfg.seq_len), 6)}
    m = RowManifest(root=os.path.abspath(output), seq_len=cfg.seq_len, image_size=cfg.image_size,
                    patch_size=cfg.patch_size, n_patches=cfg.n_patches, tokenizer="tokenizer.model",
                    sources=list(cfg.sources), shards=infos,
                    extra={"pack": fp, "per_source": per_source, "errors": errors + report.shards_failed,
                           "rank_rows": rank_rows})
    shutil.copyfile(tok, os.path.join(output, "tokenizer.model"))  # the rows' ids mean this tokenizer
    write_row_manifest(m)
    report.seconds = time.time() - t0
    return report


def _job(output: str, src: str, first_row: int, rows: list[PlannedRow], rows_per_shard: int) -> _ShardJob:
    rel = f"{src}/train-{first_row // rows_per_shard:05d}.tar"
    return _ShardJob(os.path.join(output, rel), RowShardInfo(path=rel, source=src, split="train"), first_row, rows)


def report_dict(r: PackReport) -> dict:
    return asdict(r)
