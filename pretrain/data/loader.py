"""The training loader (infinite, resumable) and the held-out evaluation batches.

Design (simplest exact one): everything runs in the calling process and every random choice is
a pure function of (seed, source, epoch, index), so the loader's whole state is a few integers
plus the identities of the documents waiting in the packing buffers. Resume re-reads those few
documents by random access into the tars (`ShardReader`) and recomputes their augmentations from
the same seeds, so batches after `load_state_dict` equal those of an uninterrupted run.

Per source and rank, `SourceStream` defines the document order of epoch e:
  * shards are permuted by rng(seed, source, e) and their documents concatenated, each shard's
    documents permuted by rng(seed, source, e, shard); the manifest's sample counts give the
    total N without opening a tar;
  * rank r reads the contiguous range [r * N//W, (r+1) * N//W) of that sequence: every rank gets
    exactly N//W documents per epoch whatever the shard count or sizes (3 shards over 2 ranks,
    one huge shard, more ranks than shards), ranks are disjoint, and each rank opens only the
    ~S/W + 1 shards its range touches. The N mod W leftover documents of an epoch are skipped
    (a different few each epoch, since the permutation changes).
Epochs advance on their own, independently per source: the loader is infinite, so no rank ever
waits for another (no end-of-epoch hang).

Mixture (mixture.py): the rows of each global batch (world x accumulation x micro-batch rows)
are split between sources by exact quotas, identical on every rank; each row holds one source.

Rows of the sources in DataConfig.cut_to_fit (default interleaved, text) are completed by
cutting the oldest buffered piece to the room left (packing.BestFitPacker, cut-to-fit).
Caption rows (DataConfig.fill_rows_of) can have their tail filled with text cut to fit
(`TailFiller`): a separate cursor over the fill source, whose position is part of the state.

Rows are planned from lengths and their images decoded only when a batch is built
(`lazy_images.py`): a stream's documents carry their images as undecoded placeholders, and
`__next__` decodes the batch's images (on `decode_threads` threads when > 0) before laying the
rows out. `skip_next` plans a batch without decoding it; that is how `num_workers` > 0 worker
processes (`workers.py`) share one plan and each build every N-th batch. A document's pieces are
a pure function of its position, so batches and the state are the same for any number of worker
processes or threads, and resume is exact across a change of either.
"""
from __future__ import annotations

import functools
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import numpy as np
import torch

from pretrain.batch import PackedBatch
from pretrain.data.config import DataConfig
from pretrain.data.images import process_image
from pretrain.data.lazy_images import decode_image, lazy_image, materialise_rows
from pretrain.data.mixture import MixtureSchedule, check_resume_config
from pretrain.data.packing import (BestFitPacker, Piece, SpecialIds, build_batch, chain, cut_items,
                                   document_items, drop_prefix, piece_lengths, span_length, split_items)
from pretrain.data.shards import Manifest, RawSample, ShardReader, load_manifest
from pretrain.data.stats import batch_stats
from pretrain.data.tokenizer import Tokenizer

STATE_VERSION = 2
FILL_STREAM = 1000  # stream id offset of fill cursors (their order differs from the rows' order)


def load_tokenizer(cfg: DataConfig, manifest: Optional[Manifest] = None) -> Tokenizer:
    manifest = manifest or load_manifest(cfg.root)
    return Tokenizer(cfg.tokenizer or manifest.tokenizer_path)


def _doc_items(raw_doc: dict, images: list, ids: SpecialIds, cfg: DataConfig,
               rng_key: Optional[list[int]], augment: bool) -> list:
    """A stored document (json + image bytes) -> its items (BOS, text runs, patch tensors, EOS).

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
    return document_items(parts, ids)


def _pieces(items: list, source_idx: int, seq_len: int, ref: tuple) -> list[Piece]:
    return [Piece(source_idx, its, span_length(its), ref=ref + (j,))
            for j, its in enumerate(split_items(items, seq_len))]


def _doc_pieces(raw_doc: dict, images: list, source_idx: int, ids: SpecialIds, cfg: DataConfig,
                ref: tuple, rng_key: Optional[list[int]], augment: bool) -> list[Piece]:
    """A stored document -> its pieces (images turned into patches)."""
    return _pieces(_doc_items(raw_doc, images, ids, cfg, rng_key, augment), source_idx, cfg.seq_len, ref)


class SourceStream:
    """This rank's infinite, deterministic document order over the train shards of one source.

    stream_id seeds the order (the source index for row streams, FILL_STREAM + index for a
    fill cursor over the same shards).
    """

    def __init__(self, manifest: Manifest, source: str, source_idx: int, cfg: DataConfig,
                 rank: int, world_size: int, stream_id: Optional[int] = None):
        self.shards = manifest.select(source, "train")
        if not self.shards:
            raise ValueError(f"SourceStream: no train shards for source {source!r} in "
                             f"{manifest.root}/manifest.json")
        self.paths = [manifest.abspath(s) for s in self.shards]
        self.sizes = [int(s.samples) for s in self.shards]
        self.source, self.source_idx, self.cfg = source, source_idx, cfg
        self.stream_id = source_idx if stream_id is None else stream_id
        self.rank, self.world_size = rank, world_size
        self.per_rank = sum(self.sizes) // world_size  # documents per rank and epoch
        if self.per_rank == 0:
            raise ValueError(f"SourceStream: source {source!r} has {sum(self.sizes)} train documents in "
                             f"{manifest.root}/manifest.json, fewer than the {world_size} ranks")
        self._readers: dict[int, ShardReader] = {}
        self._orders: dict[int, list[tuple[int, str]]] = {}
        self.epoch, self.index = 0, 0  # cursor: next document to read
        # [epoch, lo, hi): documents at global positions lo..hi-1 of that epoch, read before the
        # cursor; handed over when the number of ranks changed (pretrain/data/world_change.py).
        self.carry: list[list[int]] = []
        # How the document at (epoch, index) is read: the one seam for another reader of the same
        # order (offline packing, data/offline/pack.py, reads the JSON only and tags placeholders).
        self.read_sample: Callable[[int, int], RawSample] = self.read_document

    def reader(self, i: int) -> ShardReader:
        if i not in self._readers:
            r = ShardReader(self.paths[i])
            if len(r.keys) != self.sizes[i]:
                raise ValueError(f"SourceStream: shard {self.paths[i]} holds {len(r.keys)} samples but "
                                 f"manifest.json says {self.sizes[i]}; rewrite the manifest")
            self._readers[i] = r
        return self._readers[i]

    def order(self, epoch: int) -> list[tuple[int, str]]:
        """[(shard index, key)] of this rank in epoch `epoch` (exactly per_rank entries)."""
        if epoch not in self._orders:
            seed, sid = self.cfg.seed, self.stream_id
            perm = np.random.default_rng([seed, sid, epoch]).permutation(len(self.paths))
            lo = self.rank * self.per_rank
            hi = lo + self.per_rank
            order, off = [], 0
            for s in (int(x) for x in perm):
                n = self.sizes[s]
                a, b = max(lo, off), min(hi, off + n)
                if a < b:
                    keys = self.reader(s).keys
                    kperm = np.random.default_rng([seed, sid, epoch, s]).permutation(n)
                    order.extend((s, keys[k]) for k in kperm[a - off:b - off])
                off += n
                if off >= hi:
                    break
            # Keep the current and previous epoch only (resume may reference the previous one).
            for e in [e for e in self._orders if e < epoch - 1]:
                del self._orders[e]
            self._orders[epoch] = order
        return self._orders[epoch]

    def global_doc(self, epoch: int, g: int) -> tuple[int, str]:
        """(shard index, key) at position g of epoch `epoch`'s order over all ranks (the order
        `order` slices; it does not depend on the number of ranks)."""
        seed, sid = self.cfg.seed, self.stream_id
        off = 0
        for s in (int(x) for x in np.random.default_rng([seed, sid, epoch]).permutation(len(self.paths))):
            n = self.sizes[s]
            if g < off + n:
                kperm = np.random.default_rng([seed, sid, epoch, s]).permutation(n)
                return s, self.reader(s).keys[kperm[g - off]]
            off += n
        raise IndexError(f"SourceStream {self.source}: position {g} beyond the {off} documents of an epoch")

    def _doc(self, epoch: int, index: int) -> tuple[int, str]:
        # index < 0: a carried document at global position -1 - index (world_change.carried_index)
        return self.global_doc(epoch, -1 - index) if index < 0 else self.order(epoch)[index]

    def read_document(self, epoch: int, index: int) -> RawSample:
        """Raw bytes of a document (one thread only: tar handles are not thread-safe)."""
        shard, key = self._doc(epoch, index)
        return self.reader(shard).read(key)

    def _process(self, raw, epoch: int, index: int, ids: SpecialIds, augment: bool) -> list:
        """The document's items with its images as undecoded placeholders (lazy_images.py), each
        seeded by (seed, stream, epoch, index, image slot): a pure function of the position."""
        key = [self.cfg.seed, self.stream_id, epoch, index] if index >= 0 else \
            [self.cfg.seed, self.stream_id, epoch, 1 << 40, -1 - index]  # a handed-over document
        parts = []
        for part in raw.doc["parts"]:
            if isinstance(part, int):
                img = raw.images[part]
                parts.append(img if isinstance(img, torch.Tensor) else  # already a placeholder
                             lazy_image(img, self.cfg.n_patches, key + [part] if augment else None))
            else:
                parts.append(part)
        return document_items(parts, ids)

    def fetch_items(self, epoch: int, index: int, ids: SpecialIds, augment: bool) -> list:
        return self._process(self.read_sample(epoch, index), epoch, index, ids, augment)

    def fetch(self, epoch: int, index: int, ids: SpecialIds, augment: bool) -> list[Piece]:
        return _pieces(self.fetch_items(epoch, index, ids, augment), self.source_idx, self.cfg.seq_len,
                       (epoch, index))

    def key_of(self, epoch: int, index: int) -> str:
        return self._doc(epoch, index)[1]

    def _normalize(self, epoch: int, index: int) -> tuple[int, int]:
        n = self.per_rank
        return epoch + index // n, index % n

    def next_items(self, ids: SpecialIds, augment: bool) -> tuple[tuple[int, int], list]:
        """(position, items) of the next document (images undecoded); advances the cursor."""
        if self.carry:  # documents handed over from another number of ranks come first
            epoch, lo, hi = self.carry[0]
            self.carry = [[epoch, lo + 1, hi]] + self.carry[1:] if lo + 1 < hi else self.carry[1:]
            pos = (epoch, -1 - lo)
            return pos, self.fetch_items(*pos, ids, augment)
        self.epoch, self.index = self._normalize(self.epoch, self.index)
        pos = (self.epoch, self.index)
        items = self.fetch_items(*pos, ids, augment)
        self.index += 1
        return pos, items

    def next_piece(self, ids: SpecialIds, augment: bool) -> Piece:
        """The next document's first piece (later pieces chained behind it)."""
        pos, items = self.next_items(ids, augment)
        return chain(_pieces(items, self.source_idx, self.cfg.seq_len, pos))

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        self._readers.clear()


class TailFiller:
    """Fills the room best fit leaves at the end of a row with consecutive fragments of another
    source's documents (DataConfig.fill_rows_of / fill_source).

    A fragment is the next `room` tokens of the current fill document (a document may be spread
    over several rows; each fragment is its own document in its row: positions restart, no
    attention across fragments). Text is cut anywhere; an image span is never cut, and one that
    does not fit at the start of a fragment is skipped (the fill source is meant to be text).
    State: the current document's position and how many of its tokens are used.
    """

    def __init__(self, stream: SourceStream, min_tokens: int):
        self.stream, self.min_tokens = stream, min_tokens
        self.pos: Optional[tuple[int, int]] = None  # current document (None: take the next one)
        self.items: list = []
        self.offset = 0  # tokens of the current document already used

    def _load(self, ids: SpecialIds, augment: bool) -> None:
        self.pos, self.items = self.stream.next_items(ids, augment)
        self.offset = 0

    def fill(self, room: int, ids: SpecialIds, augment: bool) -> list[Piece]:
        out = []
        while room >= self.min_tokens:
            if self.pos is None:
                self._load(ids, augment)
            frag, used, skipped = cut_items(self.items, self.offset, room, skip_blocking_image=True)
            ref = ("fill", self.pos, self.offset)
            self.offset += used + skipped
            if self.offset >= span_length(self.items):
                self.pos = None
            if frag:
                out.append(Piece(self.stream.source_idx, frag, used, ref=ref))
                room -= used
        return out

    def state_dict(self) -> dict:
        return {"pos": None if self.pos is None else list(self.pos), "offset": self.offset}

    def load_state_dict(self, d: dict, ids: SpecialIds, augment: bool) -> None:
        self.pos, self.items, self.offset = None, [], 0
        if d["pos"] is not None:
            e, i = int(d["pos"][0]), int(d["pos"][1])
            self.pos, self.items, self.offset = (e, i), self.stream.fetch_items(e, i, ids, augment), int(d["offset"])


class TrainLoader:
    """Infinite iterator of PackedBatch for one rank, with an exact `state_dict`."""

    def __init__(self, cfg: DataConfig, *, rank: int, world_size: int, micro_batch_size: int,
                 global_batch_size: Optional[int] = None):
        cfg.validate()
        if not 0 <= rank < world_size:
            raise ValueError(f"build_train_loader: rank {rank} not in [0, {world_size})")
        if micro_batch_size < 1:
            raise ValueError(f"build_train_loader: micro_batch_size must be >= 1, got {micro_batch_size}")
        global_batch_size = global_batch_size or world_size * micro_batch_size
        if global_batch_size % (world_size * micro_batch_size):
            raise ValueError(f"build_train_loader: global_batch_size {global_batch_size} is not a multiple of "
                             f"world_size x micro_batch_size = {world_size * micro_batch_size}")
        self.cfg, self.rank, self.world_size, self.micro_batch_size = cfg, rank, world_size, micro_batch_size
        self.global_batch_size = global_batch_size
        self.manifest = load_manifest(cfg.root)
        self.tokenizer = load_tokenizer(cfg, self.manifest)
        self.ids = SpecialIds.of(self.tokenizer)
        self.weights = cfg.normalized_weights()
        # Threads decode and augment a batch's images (PIL releases the GIL there).
        self.pool = ThreadPoolExecutor(cfg.decode_threads, thread_name_prefix="decode") \
            if cfg.decode_threads > 0 else None
        self.streams: dict[int, SourceStream] = {
            s: SourceStream(self.manifest, name, s, cfg, rank, world_size)
            for s, name in enumerate(cfg.sources) if self.weights[s] > 0}
        self.packers = {s: BestFitPacker(cfg.seq_len, cfg.cut_min_tokens if cfg.sources[s] in cfg.cut_to_fit else 0)
                        for s in self.streams}
        self.fill_rows = {cfg.sources.index(n) for n in cfg.fill_rows_of}
        self.filler: Optional[TailFiller] = None
        if self.fill_rows:
            f_idx = cfg.sources.index(cfg.fill_source)
            self.filler = TailFiller(SourceStream(self.manifest, cfg.fill_source, f_idx, cfg, rank, world_size,
                                                  stream_id=FILL_STREAM + f_idx), cfg.fill_min_tokens)
        self.mixture = MixtureSchedule(cfg.weights, world_size=world_size, rank=rank,
                                       micro_batch_size=micro_batch_size,
                                       grad_accum=global_batch_size // (world_size * micro_batch_size))
        self.step = 0
        self.last_keys: list[list[str]] = []  # per row of the last batch: its documents' keys (debug/tests)
        self.last_stats: dict = {}  # stats.batch_stats of the last batch (padding, tokens per source, ...)

    # -- mixture ------------------------------------------------------------------------------
    def row_sources(self) -> list[int]:
        """Sources of the rows of this rank's next micro-batch (advances the mixture)."""
        return self.mixture.next_micro_batch()

    # -- iteration ----------------------------------------------------------------------------
    def next_row(self, s: int) -> list[Piece]:
        """The next packed row of source s (its pieces; tail-filled where the config asks)."""
        packer, stream = self.packers[s], self.streams[s]
        while len(packer.buffer) < self.cfg.pack_buffer:
            packer.push(stream.next_piece(self.ids, self.cfg.augment))
        row = packer.pop_row()
        if s in self.fill_rows:
            room = self.cfg.seq_len - sum(p.length for p in row)
            row.extend(self.filler.fill(room, self.ids, self.cfg.augment))
        return row

    def piece_key(self, p: Piece) -> str:
        """The key of the document a piece comes from."""
        if p.ref and p.ref[0] == "fill":
            return self.filler.stream.key_of(*p.ref[1])
        return self.streams[p.source_idx].key_of(p.ref[0], p.ref[1])

    def __iter__(self):
        return self

    def plan_next(self) -> tuple[list[int], list[list[Piece]]]:
        """The next micro-batch's row sources and rows, images undecoded; advances the state."""
        srcs = self.row_sources()
        rows = [self.next_row(s) for s in srcs]
        self.step += 1
        return srcs, rows

    def skip_next(self) -> None:
        """Advance past the next batch without decoding it (what other workers build)."""
        self.plan_next()

    def __next__(self) -> PackedBatch:
        srcs, rows = self.plan_next()
        self.last_keys = [[self.piece_key(p) for p in row] for row in rows]
        batch = self.build_rows(srcs, rows)
        self.last_stats = batch_stats(batch, self.cfg.sources, self.ids.pad)
        return batch

    def build_rows(self, row_sources: list[int], rows: list[list[Piece]]) -> PackedBatch:
        """Planned rows (from `next_row`/`plan_next`) -> a PackedBatch, their images decoded."""
        rows = materialise_rows(rows, lambda ph: decode_image(ph, self.cfg), self.pool)
        return build_batch(rows, row_sources, self.cfg.seq_len, self.ids, self.cfg.patch_dim,
                           self.cfg.image_marker_targets)

    def close(self) -> None:
        """Stop decode threads and close shard files (the loader is unusable afterwards)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        for st in list(self.streams.values()) + ([self.filler.stream] if self.filler else []):
            st.close()

    # -- resume -------------------------------------------------------------------------------
    def _fingerprint(self) -> dict:
        c = self.cfg
        return {"seed": c.seed, "sources": list(c.sources), "weights": list(c.weights),
                "seq_len": c.seq_len, "image_size": c.image_size, "patch_size": c.patch_size,
                "pack_buffer": c.pack_buffer, "rank": self.rank, "world_size": self.world_size,
                "micro_batch_size": self.micro_batch_size, "global_batch_size": self.global_batch_size,
                "fill_rows_of": list(c.fill_rows_of), "fill_source": c.fill_source,
                "fill_min_tokens": c.fill_min_tokens, "cut_to_fit": list(c.cut_to_fit),
                "cut_min_tokens": c.cut_min_tokens}

    def state_dict(self) -> dict:
        """Small, JSON-able: cursors, mixture counters and the refs of the buffered pieces."""
        return {
            "version": STATE_VERSION,
            "config": self._fingerprint(),
            "step": self.step,
            "mixture": self.mixture.state_dict(),
            "streams": {self.cfg.sources[s]: {"epoch": st.epoch, "index": st.index, "carry": st.carry,
                                              "buffer": [list(p.ref) for p in self.packers[s].buffer]}
                        for s, st in self.streams.items()},
            "filler": None if self.filler is None else {
                "epoch": self.filler.stream.epoch, "index": self.filler.stream.index,
                "carry": self.filler.stream.carry, **self.filler.state_dict()},
        }

    def load_state_dict(self, d: dict) -> None:
        if d.get("version") != STATE_VERSION:
            raise ValueError(f"TrainLoader.load_state_dict: state version {d.get('version')}, "
                             f"expected {STATE_VERSION}")
        check_resume_config("TrainLoader", d["config"], self._fingerprint())
        self.step = int(d["step"])
        self.mixture.load_state_dict(d["mixture"])
        for s, st in self.streams.items():
            sd = d["streams"][self.cfg.sources[s]]
            st.epoch, st.index = int(sd["epoch"]), int(sd["index"])
            st.carry = [list(map(int, r)) for r in sd.get("carry", [])]
            packer = self.packers[s]
            packer.buffer = []
            cache: dict[tuple[int, int], list[Piece]] = {}
            for ref in sd["buffer"]:  # (epoch, index, piece j[, tokens already cut off piece j])
                epoch, index, j = ref[:3]
                if (epoch, index) not in cache:
                    cache[(epoch, index)] = st.fetch(epoch, index, self.ids, self.cfg.augment)
                packer.push(drop_prefix(chain(cache[(epoch, index)][j:]), ref[3] if len(ref) > 3 else 0))
        if self.filler is not None:
            fd = d["filler"]
            fs = self.filler.stream
            fs.epoch, fs.index = int(fd["epoch"]), int(fd["index"])
            fs.carry = [list(map(int, r)) for r in fd.get("carry", [])]
            self.filler.load_state_dict(fd, self.ids, self.cfg.augment)


def build_train_loader(cfg: DataConfig, *, rank: int, world_size: int, micro_batch_size: int,
                       global_batch_size: Optional[int] = None) -> TrainLoader:
    """Infinite iterator of PackedBatch (CPU tensors) for this rank, with state_dict/load_state_dict.

    global_batch_size (rows, = world x accumulation x micro-batch) lets the mixture be exact per
    optimizer step; None means no accumulation (global batch = world_size x micro_batch_size).
    With cfg.num_workers > 0 the loader runs in worker processes (workers.py): same batches.
    """
    kw = dict(rank=rank, world_size=world_size, micro_batch_size=micro_batch_size,
              global_batch_size=global_batch_size)
    if cfg.format == "packed_rows":  # rows fixed offline by tools/pack_shards.py (row_loader.py)
        from pretrain.data.offline.row_loader import RowLoader
        make = functools.partial(RowLoader, cfg, **kw)
    else:
        make = functools.partial(TrainLoader, cfg, **kw)
    if cfg.num_workers == 0:
        return make()
    from pretrain.data.workers import ProcessLoader
    cfg.validate()  # here, not first inside a worker
    return ProcessLoader(make, cfg.num_workers)


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
        batches.append(build_batch(rows, [s_idx] * len(rows), cfg.seq_len, ids, cfg.patch_dim,
                                   cfg.image_marker_targets))
    for r in readers:
        r.close()
    return batches
