"""The training loader (infinite, resumable) and the held-out evaluation batches.

Design (simplest exact one): everything runs in the calling process and every random choice is
a pure function of (seed, source, epoch, index), so the loader's whole state is a few integers
plus the identities of the documents waiting in the packing buffers. Resume re-reads those few
documents by random access into the tars (`ShardReader`) and recomputes their augmentations from
the same seeds, so batches after `load_state_dict` equal those of an uninterrupted run.

Per source and rank, `SourceStream` defines the document order of epoch e:
  * shards are permuted by rng(seed, source, e); with at least `world_size` shards each rank
    takes every world_size-th shard of the permutation (disjoint, no rank without data);
    with fewer shards every rank reads all of them and keeps every world_size-th document;
  * inside a shard, documents are permuted by rng(seed, source, e, shard).
Epochs advance on their own, independently per source.

Mixture: each row of a micro-batch belongs to one source; the source of row n (counted over the
whole run) is chosen by smooth weighted round-robin on `weights`, so proportions are exact up to
one row per source at any time, identical on every rank, and hence held per global batch too.
`row_sources()` is the seam where an exact-per-global-batch scheduler would plug in.

`num_workers` > 0 adds a thread pool that decodes and augments the next few documents of each
stream ahead of use. Because a document's pieces are a pure function of its position, prefetching
cannot change any batch, so resume stays exact with no worker state to save. (Threads rather
than torch DataLoader processes: the packer is sequential state, and PIL/numpy release the GIL
in decode/resize; tar reads stay on the calling thread.)
"""
from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import numpy as np
import torch

from pretrain.batch import PackedBatch
from pretrain.data.config import DataConfig
from pretrain.data.images import process_image
from pretrain.data.packing import (BestFitPacker, Piece, SpecialIds, build_batch, chain,
                                   document_items, piece_lengths, span_length, split_items)
from pretrain.data.shards import Manifest, ShardReader, load_manifest
from pretrain.data.tokenizer import Tokenizer

STATE_VERSION = 1


def load_tokenizer(cfg: DataConfig, manifest: Optional[Manifest] = None) -> Tokenizer:
    manifest = manifest or load_manifest(cfg.root)
    return Tokenizer(cfg.tokenizer or manifest.tokenizer_path)


def _doc_pieces(raw_doc: dict, images: list, source_idx: int, ids: SpecialIds, cfg: DataConfig,
                ref: tuple, rng_key: Optional[list[int]], augment: bool) -> list[Piece]:
    """A stored document (json + image bytes) -> its pieces (images turned into patches).

    images may be bytes (decoded and processed here) or placeholders (tensors [n_patches, 0])
    when only lengths matter.
    """
    parts = []
    for part in raw_doc["parts"]:
        if isinstance(part, int):
            img = images[part]
            if isinstance(img, torch.Tensor):
                parts.append(img)
            else:
                rng = np.random.default_rng(rng_key + [part]) if augment else None
                parts.append(process_image(img, cfg.image_size, cfg.patch_size, augment=augment,
                                           scale=(cfg.crop_scale_min, cfg.crop_scale_max),
                                           hflip_prob=cfg.hflip_prob, rng=rng))
        else:
            parts.append(part)
    pieces = split_items(document_items(parts, ids), cfg.seq_len)
    return [Piece(source_idx, items, span_length(items), ref=ref + (j,)) for j, items in enumerate(pieces)]


class SourceStream:
    """This rank's infinite, deterministic document order over the train shards of one source."""

    def __init__(self, manifest: Manifest, source: str, source_idx: int, cfg: DataConfig,
                 rank: int, world_size: int, pool: Optional[ThreadPoolExecutor] = None):
        self.shards = manifest.select(source, "train")
        if not self.shards:
            raise ValueError(f"SourceStream: no train shards for source {source!r} in "
                             f"{manifest.root}/manifest.json")
        self.paths = [manifest.abspath(s) for s in self.shards]
        self.source, self.source_idx, self.cfg = source, source_idx, cfg
        self.rank, self.world_size = rank, world_size
        self._readers: dict[int, ShardReader] = {}
        self._orders: dict[int, list[tuple[int, str]]] = {}
        self.epoch, self.index = 0, 0  # cursor: next document to read
        self.pool = pool  # optional thread pool shared by the sources (DataConfig.num_workers)
        self.prefetch = 4 * getattr(pool, "_max_workers", 1)
        self.pending: dict[tuple[int, int], Future] = {}

    def reader(self, i: int) -> ShardReader:
        if i not in self._readers:
            self._readers[i] = ShardReader(self.paths[i])
        return self._readers[i]

    def order(self, epoch: int) -> list[tuple[int, str]]:
        """[(shard index, key)] of this rank in epoch `epoch`."""
        if epoch not in self._orders:
            seed = self.cfg.seed
            perm = np.random.default_rng([seed, self.source_idx, epoch]).permutation(len(self.paths))
            mine = perm[self.rank::self.world_size] if len(perm) >= self.world_size else perm
            order = []
            for s in mine:
                keys = self.reader(int(s)).keys
                kperm = np.random.default_rng([seed, self.source_idx, epoch, int(s)]).permutation(len(keys))
                order.extend((int(s), keys[k]) for k in kperm)
            if len(perm) < self.world_size:
                order = order[self.rank::self.world_size]
            if not order:
                raise ValueError(f"SourceStream: source {self.source!r} has no train documents for "
                                 f"rank {self.rank} of {self.world_size}")
            # Keep the current and previous epoch only (resume may reference the previous one).
            for e in [e for e in self._orders if e < epoch - 1]:
                del self._orders[e]
            self._orders[epoch] = order
        return self._orders[epoch]

    def _read(self, epoch: int, index: int):
        """Raw bytes of a document (main thread only: tar handles are not thread-safe)."""
        shard, key = self.order(epoch)[index]
        return self.reader(shard).read(key)

    def _process(self, raw, epoch: int, index: int, ids: SpecialIds, augment: bool) -> list[Piece]:
        """Pure function of (raw document, seed, source, epoch, index): safe to run in a thread."""
        return _doc_pieces(raw.doc, raw.images, self.source_idx, ids, self.cfg, ref=(epoch, index),
                           rng_key=[self.cfg.seed, self.source_idx, epoch, index], augment=augment)

    def fetch(self, epoch: int, index: int, ids: SpecialIds, augment: bool) -> list[Piece]:
        return self._process(self._read(epoch, index), epoch, index, ids, augment)

    def key_of(self, epoch: int, index: int) -> str:
        return self.order(epoch)[index][1]

    def _normalize(self, epoch: int, index: int) -> tuple[int, int]:
        while index >= len(self.order(epoch)):
            index -= len(self.order(epoch))
            epoch += 1
        return epoch, index

    def next_piece(self, ids: SpecialIds, augment: bool) -> Piece:
        """The next document's first piece (later pieces chained behind it).

        With a thread pool, the next few documents are decoded and augmented ahead of time.
        That cannot change results: a document's pieces are a pure function of its position.
        """
        self.epoch, self.index = self._normalize(self.epoch, self.index)
        pos = (self.epoch, self.index)
        if self.pool is None:
            pieces = self.fetch(*pos, ids, augment)
        else:
            ahead = pos
            for _ in range(self.prefetch):
                if ahead not in self.pending:
                    self.pending[ahead] = self.pool.submit(self._process, self._read(*ahead), *ahead, ids, augment)
                ahead = self._normalize(ahead[0], ahead[1] + 1)
            pieces = self.pending.pop(pos).result()
        self.index += 1
        return chain(pieces)

    def reset_prefetch(self) -> None:
        for f in self.pending.values():
            f.cancel()
        self.pending.clear()


class TrainLoader:
    """Infinite iterator of PackedBatch for one rank, with an exact `state_dict`."""

    def __init__(self, cfg: DataConfig, *, rank: int, world_size: int, micro_batch_size: int):
        cfg.validate()
        if not 0 <= rank < world_size:
            raise ValueError(f"build_train_loader: rank {rank} not in [0, {world_size})")
        if micro_batch_size < 1:
            raise ValueError(f"build_train_loader: micro_batch_size must be >= 1, got {micro_batch_size}")
        self.cfg, self.rank, self.world_size, self.micro_batch_size = cfg, rank, world_size, micro_batch_size
        self.manifest = load_manifest(cfg.root)
        self.tokenizer = load_tokenizer(cfg, self.manifest)
        self.ids = SpecialIds.of(self.tokenizer)
        self.weights = cfg.normalized_weights()
        # Worker threads decode and augment images ahead of use (PIL releases the GIL there).
        self.pool = ThreadPoolExecutor(cfg.num_workers, thread_name_prefix="data") if cfg.num_workers > 0 else None
        self.streams: dict[int, SourceStream] = {
            s: SourceStream(self.manifest, name, s, cfg, rank, world_size, self.pool)
            for s, name in enumerate(cfg.sources) if self.weights[s] > 0}
        self.packers = {s: BestFitPacker(cfg.seq_len) for s in self.streams}
        self.rows_done = 0  # rows emitted so far (the mixture's clock)
        self.row_counts = [0] * len(cfg.sources)  # rows emitted per source
        self.step = 0
        self.last_keys: list[list[str]] = []  # per row of the last batch: its documents' keys (debug/tests)

    # -- mixture ------------------------------------------------------------------------------
    def row_sources(self, n_rows: int) -> list[int]:
        """Sources of the next n_rows rows: smooth weighted round-robin (deterministic, exact to
        within one row per source). Advances the mixture state."""
        out = []
        for _ in range(n_rows):
            total = self.rows_done + 1
            deficits = [self.weights[s] * total - self.row_counts[s] if self.weights[s] > 0 else -math.inf
                        for s in range(len(self.weights))]
            s = int(np.argmax(deficits))
            self.row_counts[s] += 1
            self.rows_done += 1
            out.append(s)
        return out

    # -- iteration ----------------------------------------------------------------------------
    def _next_row(self, s: int) -> list[Piece]:
        packer, stream = self.packers[s], self.streams[s]
        while len(packer.buffer) < self.cfg.pack_buffer:
            packer.push(stream.next_piece(self.ids, self.cfg.augment))
        return packer.pop_row()

    def __iter__(self):
        return self

    def __next__(self) -> PackedBatch:
        srcs = self.row_sources(self.micro_batch_size)
        rows = [self._next_row(s) for s in srcs]
        self.last_keys = [[self.streams[p.source_idx].key_of(p.ref[0], p.ref[1]) for p in row] for row in rows]
        self.step += 1
        return build_batch(rows, srcs, self.cfg.seq_len, self.ids, self.cfg.patch_dim)

    def close(self) -> None:
        """Stop worker threads and close shard files (the loader is unusable afterwards)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        for st in self.streams.values():
            st.pending.clear()
            for r in st._readers.values():
                r.close()
            st._readers.clear()

    # -- resume -------------------------------------------------------------------------------
    def _fingerprint(self) -> dict:
        c = self.cfg
        return {"seed": c.seed, "sources": list(c.sources), "weights": list(c.weights),
                "seq_len": c.seq_len, "image_size": c.image_size, "patch_size": c.patch_size,
                "pack_buffer": c.pack_buffer, "rank": self.rank, "world_size": self.world_size,
                "micro_batch_size": self.micro_batch_size}

    def state_dict(self) -> dict:
        """Small, JSON-able: cursors, mixture counters and the refs of the buffered pieces."""
        return {
            "version": STATE_VERSION,
            "config": self._fingerprint(),
            "step": self.step,
            "rows_done": self.rows_done,
            "row_counts": list(self.row_counts),
            "streams": {self.cfg.sources[s]: {"epoch": st.epoch, "index": st.index,
                                              "buffer": [list(p.ref) for p in self.packers[s].buffer]}
                        for s, st in self.streams.items()},
        }

    def load_state_dict(self, d: dict) -> None:
        if d.get("version") != STATE_VERSION:
            raise ValueError(f"TrainLoader.load_state_dict: state version {d.get('version')}, "
                             f"expected {STATE_VERSION}")
        mine = self._fingerprint()
        for k, v in d["config"].items():
            if mine.get(k) != v:
                raise ValueError(f"TrainLoader.load_state_dict: saved {k}={v!r} but this loader has "
                                 f"{k}={mine.get(k)!r}; exact resume needs the same data config")
        self.step, self.rows_done = int(d["step"]), int(d["rows_done"])
        self.row_counts = [int(x) for x in d["row_counts"]]
        for s, st in self.streams.items():
            sd = d["streams"][self.cfg.sources[s]]
            st.epoch, st.index = int(sd["epoch"]), int(sd["index"])
            st.reset_prefetch()
            packer = self.packers[s]
            packer.buffer = []
            cache: dict[tuple[int, int], list[Piece]] = {}
            for epoch, index, j in sd["buffer"]:
                if (epoch, index) not in cache:
                    cache[(epoch, index)] = st.fetch(epoch, index, self.ids, self.cfg.augment)
                packer.push(chain(cache[(epoch, index)][j:]))


def build_train_loader(cfg: DataConfig, *, rank: int, world_size: int, micro_batch_size: int) -> TrainLoader:
    """Infinite iterator of PackedBatch (CPU tensors) for this rank, with state_dict/load_state_dict."""
    return TrainLoader(cfg, rank=rank, world_size=world_size, micro_batch_size=micro_batch_size)


def build_eval_batches(cfg: DataConfig, source: str, *, rank: int, world_size: int,
                       micro_batch_size: int, max_batches: int) -> list[PackedBatch]:
    """The held-out ('val') split of one source as packed batches: deterministic, no augmentation
    (centre-resize), documents dealt round-robin to ranks, and the same number of batches on
    every rank (the last one topped up with all-padding rows where a rank runs short)."""
    cfg.validate()
    if source not in cfg.sources:
        raise ValueError(f"build_eval_batches: source {source!r} not in DataConfig.sources {cfg.sources}")
    manifest = load_manifest(cfg.root)
    tok = load_tokenizer(cfg, manifest)
    ids = SpecialIds.of(tok)
    s_idx = cfg.sources.index(source)
    shards = manifest.select(source, "val")
    if not shards:
        raise ValueError(f"build_eval_batches: no val shards for source {source!r} in {manifest.root}")
    readers = [ShardReader(manifest.abspath(s)) for s in shards]
    docs = [(r, key) for r in readers for key in r.keys]  # canonical order
    jsons: dict[int, dict] = {}  # read lazily: planning stops after max_batches worth of rows

    def json_of(i: int) -> dict:
        if i not in jsons:
            jsons[i] = docs[i][0].read_json(docs[i][1])
        return jsons[i]
    need_rows = max_batches * micro_batch_size

    def plan(rk: int) -> list[list[Piece]]:
        """Rank rk's rows from lengths only (no decoding), stopping once need_rows are planned."""
        packer, rows = BestFitPacker(cfg.seq_len), []
        mine = iter(range(rk, len(docs), world_size))
        exhausted = False
        while len(rows) < need_rows:
            while not exhausted and len(packer.buffer) < cfg.pack_buffer:
                i = next(mine, None)
                if i is None:
                    exhausted = True
                    break
                sizes = [("image", cfg.n_patches) if isinstance(p, int) else ("text", len(p))
                         for p in json_of(i)["parts"]]
                packer.push(chain([Piece(s_idx, [], n, ref=(i, j))
                                   for j, n in enumerate(piece_lengths(sizes, cfg.seq_len))]))
            if not packer.buffer:
                break
            rows.append(packer.pop_row())
        return rows

    # Every rank plans every rank's rows (cheap: lengths only, at most need_rows each) so that all
    # agree on the batch count without communicating.
    n_rows = [len(plan(rk)) if rk != rank else 0 for rk in range(world_size)]
    my_rows = plan(rank)
    n_rows[rank] = len(my_rows)
    n_batches = min(max_batches, min(math.ceil(n / micro_batch_size) for n in n_rows))
    my_rows = my_rows[:n_batches * micro_batch_size]
    cache: dict[int, list[Piece]] = {}
    real_rows = []
    for row in my_rows:
        real = []
        for p in row:
            i, j = p.ref
            if i not in cache:
                r, key = docs[i]
                raw = r.read(key)
                cache[i] = _doc_pieces(raw.doc, raw.images, s_idx, ids, cfg, ref=(i,), rng_key=None,
                                       augment=False)
            if cache[i][j].length != p.length:  # planning and materialising must agree
                raise RuntimeError(f"build_eval_batches: planned length {p.length} != {cache[i][j].length}")
            real.append(cache[i][j])
        real_rows.append(real)
    while len(real_rows) < n_batches * micro_batch_size:
        real_rows.append([])  # all-padding row: no loss, keeps shapes equal across ranks
    batches = []
    for b in range(n_batches):
        rows = real_rows[b * micro_batch_size:(b + 1) * micro_batch_size]
        batches.append(build_batch(rows, [s_idx] * len(rows), cfg.seq_len, ids, cfg.patch_dim))
    for r in readers:
        r.close()
    return batches
