"""The training loader over packed-row shards (tools/pack_shards.py): same interface as TrainLoader.

    cfg = DataConfig(root="data/demo", format="packed_rows", rows_root="data/demo_rows")
    loader = build_train_loader(cfg, rank=0, world_size=1, micro_batch_size=8)  # -> RowLoader
    batch = next(loader); state = loader.state_dict(); loader.load_state_dict(state)

Rows were fixed offline, so this loader only reads: per row it decodes the JPEGs, augments them,
patchifies and lays the row out with the online `build_batch` (one layout code path).

Order. Per source, a rank reads an infinite sequence of passes over that source's rows. Pass p
orders the row shards and, inside each shard, the rows -- both by rng(seed, source, p, ...) --
except pass 0, which keeps the stored order: the rows were packed from the online seeded order,
so stored order is already shuffled, and it is exactly the online loader's order (what makes the
two paths give identical batches). Rank r of W takes the contiguous block [r*n, (r+1)*n) of each
pass, n = rows // W: disjoint, equal for every rank (so equal batches per rank, always), and it
touches only about 1/W of the shards. At most W-1 rows per pass are skipped (different ones each
pass, since the order changes).

Augmentation. Each image carries the key under which the online loader draws its crop and flip
(rows.py); pass 0 draws from rng(seed, stream_id, epoch, index, part), exactly the online
generator, later passes append p (new crops when rows repeat).

Mixture: the online `MixtureSchedule` (data/mixture.py), so the sources of the rows of every global
batch are the online ones. Exact resume: the state is (pass, k) per source plus the schedule's
state; a row's patches are a pure function of (row, pass, seed), so prefetching threads
(`decode_threads`) and worker processes (`num_workers`, data/workers.py) change nothing and have no
state to save.
"""
from __future__ import annotations

import bisect
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import numpy as np

from pretrain.batch import PackedBatch
from pretrain.data.config import DataConfig
from pretrain.data.images import process_image
from pretrain.data.mixture import MixtureSchedule, check_resume_config
from pretrain.data.packing import Piece, SpecialIds, build_batch, span_length
from pretrain.data.offline.rows import PackedRow, RowManifest, RowShardReader, load_row_manifest
from pretrain.data.stats import batch_stats
from pretrain.data.tokenizer import Tokenizer

STATE_VERSION = 1


def rows_root_of(cfg: DataConfig, rows_root: Optional[str] = None) -> str:
    """Where the packed rows live: the argument, else DataConfig.rows_root, else DataConfig.root."""
    return rows_root or cfg.rows_root or cfg.root


def row_pieces(row: PackedRow, pass_: int, cfg: DataConfig, source_index: dict[str, int],
               augment: bool) -> list[Piece]:
    """A stored row -> its pieces with images decoded, augmented and patchified.

    Pure function of (row, pass, seed): safe in worker threads, and identical to the online
    pieces in pass 0 (same rng key per image, same process_image call).
    """
    pieces = []
    for rp in row.pieces:
        items: list = []
        for part in rp.parts:
            if isinstance(part, int):
                src, offset, epoch, index, k = row.image_keys[part]
                key = [cfg.seed, source_index[src] + int(offset), int(epoch), int(index), int(k)]
                rng = np.random.default_rng(key + ([pass_] if pass_ > 0 else [])) if augment else None
                items.append(process_image(row.images[part], cfg.image_size, cfg.patch_size, augment=augment,
                                           scale=(cfg.crop_scale_min, cfg.crop_scale_max),
                                           hflip_prob=cfg.hflip_prob, rng=rng))
            else:
                items.append(np.asarray(part, dtype=np.int64))
        if span_length(items) != rp.length:
            raise ValueError(f"row_pieces: piece {rp.key} {rp.ref} lays out {span_length(items)} tokens, "
                             f"stored length {rp.length} (packed with another image size?)")
        pieces.append(Piece(source_index[rp.source], items, rp.length, ref=tuple(rp.ref)))
    return pieces


class RowStream:
    """This rank's infinite, deterministic row order over the row shards of one source."""

    def __init__(self, manifest: RowManifest, source: str, source_idx: int, cfg: DataConfig,
                 rank: int, world_size: int, pool: Optional[ThreadPoolExecutor] = None):
        self.shards = manifest.select(source, "train")
        self.counts = [s.rows for s in self.shards]
        self.n_rows = sum(self.counts)
        if self.n_rows == 0:
            raise ValueError(f"RowStream: no packed train rows for source {source!r} in "
                             f"{manifest.root}/manifest.json")
        self.paths = [manifest.abspath(s) for s in self.shards]
        self.source, self.source_idx, self.cfg = source, source_idx, cfg
        self.rank, self.world_size, self.seq_len = rank, world_size, manifest.seq_len
        # Equal rows per rank and pass; with fewer rows than ranks, ranks share rows (no starving).
        self.per_rank = max(1, self.n_rows // world_size)
        # Rows packed for this world size (pack_shards world_size=W) hold each rank's online rows
        # as one block: pass 0 reads this rank's own block, so the batches equal the online ones.
        rank_rows = (manifest.extra.get("rank_rows") or {}).get(source)
        self.block_start = None
        if rank_rows and len(rank_rows) == world_size and min(rank_rows) > 0:
            self.block_start = sum(rank_rows[:rank])
            self.per_rank = min(rank_rows)
        self.pass_, self.k = 0, 0  # cursor: next row is row k of this rank's block in pass pass_
        self._readers: dict[int, RowShardReader] = {}
        self._plans: dict[int, tuple[np.ndarray, list[int]]] = {}
        self._row_perms: dict[tuple[int, int], np.ndarray] = {}
        self.pool = pool
        self.prefetch = 2 * getattr(pool, "_max_workers", 1)
        self.pending: dict[tuple[int, int], Future] = {}

    def reader(self, i: int) -> RowShardReader:
        if i not in self._readers:
            r = RowShardReader(self.paths[i], self.seq_len)
            if len(r.keys) != self.counts[i]:
                raise ValueError(f"RowStream: {self.paths[i]} holds {len(r.keys)} rows, the manifest "
                                 f"says {self.counts[i]} (rewritten without its manifest?)")
            self._readers[i] = r
        return self._readers[i]

    def _plan(self, p: int) -> tuple[np.ndarray, list[int]]:
        """Shard order of pass p and the cumulative row counts along it."""
        if p not in self._plans:
            n = len(self.paths)
            # Pass 0: stored order (= the online order, see the module docstring).
            order = (np.arange(n) if p == 0 else
                     np.random.default_rng([self.cfg.seed, self.source_idx, p]).permutation(n))
            cum = [0]
            for i in order:
                cum.append(cum[-1] + self.counts[int(i)])
            self._plans = {q: v for q, v in self._plans.items() if q >= p - 1}  # keep two passes
            self._row_perms = {q: v for q, v in self._row_perms.items() if q[0] >= p - 1}
            self._plans[p] = (order, cum)
        return self._plans[p]

    def locate(self, p: int, k: int) -> tuple[int, str]:
        """(shard index, row key) of row k of this rank's block in pass p."""
        order, cum = self._plan(p)
        if p == 0 and self.block_start is not None:
            g = self.block_start + k
        else:
            g = (self.rank * self.per_rank + k) % self.n_rows
        j = bisect.bisect_right(cum, g) - 1
        shard = int(order[j])
        local = g - cum[j]
        if p > 0:
            if (p, shard) not in self._row_perms:
                rng = np.random.default_rng([self.cfg.seed, self.source_idx, p, shard])
                self._row_perms[(p, shard)] = rng.permutation(self.counts[shard])
            local = int(self._row_perms[(p, shard)][local])
        return shard, self.reader(shard).keys[local]

    def _read(self, p: int, k: int) -> PackedRow:
        """Row bytes (main thread only: tar handles are not thread-safe)."""
        shard, key = self.locate(p, k)
        return self.reader(shard).read(key)

    def _advance(self, p: int, k: int) -> tuple[int, int]:
        k += 1
        return (p + 1, 0) if k >= self.per_rank else (p, k)

    def next_row(self, source_index: dict[str, int], augment: bool) -> tuple[list[Piece], list[str]]:
        """The next row's pieces and its documents' keys."""
        pos = (self.pass_, self.k)
        if self.pool is None:
            row = self._read(*pos)
            pieces = row_pieces(row, pos[0], self.cfg, source_index, augment)
        else:
            ahead = pos
            for _ in range(self.prefetch):
                if ahead not in self.pending:
                    r = self._read(*ahead)
                    self.pending[ahead] = self.pool.submit(
                        lambda r=r, p=ahead[0]: (r, row_pieces(r, p, self.cfg, source_index, augment)))
                ahead = self._advance(*ahead)
            row, pieces = self.pending.pop(pos).result()
        self.pass_, self.k = self._advance(*pos)
        return pieces, [p.key for p in row.pieces]

    def skip_row(self) -> None:
        """Advance past the next row without decoding it (a row another worker builds)."""
        pos = (self.pass_, self.k)
        f = self.pending.pop(pos, None)
        if f is not None:
            f.cancel()
        self.pass_, self.k = self._advance(*pos)

    def reset_prefetch(self) -> None:
        for f in self.pending.values():
            f.cancel()
        self.pending.clear()

    def close(self) -> None:
        self.reset_prefetch()
        for r in self._readers.values():
            r.close()
        self._readers.clear()


class RowLoader:
    """Infinite iterator of PackedBatch over packed rows for one rank, with an exact `state_dict`."""

    def __init__(self, cfg: DataConfig, *, rank: int, world_size: int, micro_batch_size: int,
                 global_batch_size: Optional[int] = None, rows_root: Optional[str] = None):
        cfg.validate()
        if not 0 <= rank < world_size:
            raise ValueError(f"RowLoader: rank {rank} not in [0, {world_size})")
        if micro_batch_size < 1:
            raise ValueError(f"RowLoader: micro_batch_size must be >= 1, got {micro_batch_size}")
        global_batch_size = global_batch_size or world_size * micro_batch_size
        if global_batch_size % (world_size * micro_batch_size):
            raise ValueError(f"RowLoader: global_batch_size {global_batch_size} is not a multiple of "
                             f"world_size x micro_batch_size = {world_size * micro_batch_size}")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.micro_batch_size, self.global_batch_size = micro_batch_size, global_batch_size
        self.manifest = load_row_manifest(rows_root_of(cfg, rows_root))
        m = self.manifest
        if (m.seq_len, m.n_patches) != (cfg.seq_len, cfg.n_patches):
            raise ValueError(f"RowLoader: rows in {m.root} were packed with seq_len={m.seq_len}, "
                             f"n_patches={m.n_patches}; DataConfig asks seq_len={cfg.seq_len}, "
                             f"n_patches={cfg.n_patches}; re-pack with tools/pack_shards.py")
        self.tokenizer = Tokenizer(cfg.tokenizer or m.tokenizer_path)
        self.ids = SpecialIds.of(self.tokenizer)
        self.weights = cfg.normalized_weights()
        self.source_index = {name: s for s, name in enumerate(cfg.sources)}
        # Rows may hold pieces of any packed source (tail filling), so all must have an index.
        unknown = sorted(set(m.sources) - set(cfg.sources))
        if unknown:
            raise ValueError(f"RowLoader: the rows in {m.root} hold sources {unknown} missing from "
                             f"DataConfig.sources {cfg.sources}; list them (weight 0 to not draw their rows)")
        # The online schedule, built as TrainLoader builds it, so both paths agree row for row.
        self.schedule = MixtureSchedule(cfg.weights, world_size=world_size, rank=rank,
                                        micro_batch_size=micro_batch_size,
                                        grad_accum=global_batch_size // (world_size * micro_batch_size))
        self.pool = ThreadPoolExecutor(cfg.decode_threads, thread_name_prefix="rows") \
            if cfg.decode_threads > 0 else None
        self.streams: dict[int, RowStream] = {
            s: RowStream(m, name, s, cfg, rank, world_size, self.pool)
            for s, name in enumerate(cfg.sources) if self.weights[s] > 0}
        self.step = 0
        self.last_keys: list[list[str]] = []  # per row of the last batch: its documents' keys
        self.last_stats: dict = {}  # stats.batch_stats of the last batch, as TrainLoader.last_stats

    def __iter__(self):
        return self

    def __next__(self) -> PackedBatch:
        srcs = self.schedule.next_micro_batch()
        rows, self.last_keys = [], []
        for s in srcs:
            pieces, keys = self.streams[s].next_row(self.source_index, self.cfg.augment)
            rows.append(pieces)
            self.last_keys.append(keys)
        self.step += 1
        batch = build_batch(rows, srcs, self.cfg.seq_len, self.ids, self.cfg.patch_dim,
                            self.cfg.image_marker_targets)
        self.last_stats = batch_stats(batch, self.cfg.sources, self.ids.pad)
        return batch

    def skip_next(self) -> None:
        """Advance past the next batch without decoding it (what other worker processes build)."""
        for s in self.schedule.next_micro_batch():
            self.streams[s].skip_row()
        self.step += 1

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        for st in self.streams.values():
            st.close()

    # -- resume -------------------------------------------------------------------------------
    def _fingerprint(self) -> dict:
        c = self.cfg
        return {"format": "packed_rows", "seed": c.seed, "sources": list(c.sources), "weights": list(c.weights),
                "seq_len": c.seq_len, "image_size": c.image_size, "patch_size": c.patch_size,
                "rank": self.rank, "world_size": self.world_size, "micro_batch_size": self.micro_batch_size,
                "global_batch_size": self.global_batch_size,
                "rows": {c.sources[s]: st.n_rows for s, st in self.streams.items()}}

    def state_dict(self) -> dict:
        """Small, JSON-able: (pass, k) per source and the mixture schedule's counters."""
        return {"version": STATE_VERSION, "config": self._fingerprint(), "step": self.step,
                "mixture": self.schedule.state_dict(),
                "streams": {self.cfg.sources[s]: {"pass": st.pass_, "k": st.k} for s, st in self.streams.items()}}

    def load_state_dict(self, d: dict) -> None:
        if d.get("version") != STATE_VERSION or d.get("config", {}).get("format") != "packed_rows":
            raise ValueError(f"RowLoader.load_state_dict: not a packed-row loader state of version "
                             f"{STATE_VERSION} (got version {d.get('version')}, "
                             f"format {d.get('config', {}).get('format')!r})")
        check_resume_config("RowLoader", d["config"], self._fingerprint(), "data config and rows")
        self.step = int(d["step"])
        self.schedule.load_state_dict(d["mixture"])
        for s, st in self.streams.items():
            sd = d["streams"][self.cfg.sources[s]]
            st.reset_prefetch()
            st.pass_, st.k = int(sd["pass"]), int(sd["k"])


def build_row_loader(cfg: DataConfig, *, rank: int, world_size: int, micro_batch_size: int,
                     global_batch_size: Optional[int] = None, rows_root: Optional[str] = None) -> RowLoader:
    """Infinite iterator of PackedBatch over packed rows (what build_train_loader returns when
    DataConfig.format == "packed_rows")."""
    return RowLoader(cfg, rank=rank, world_size=world_size, micro_batch_size=micro_batch_size,
                     global_batch_size=global_batch_size, rows_root=rows_root)


def bench_row_loader(cfg: DataConfig, *, rows_root: Optional[str] = None, micro_batch_size: int = 8,
                     seconds: Optional[float] = None, batches: int = 20, warmup: int = 4) -> float:
    """Loader throughput over packed rows in tokens per second per core: B*T tokens per batch over
    the process CPU time (so threads and other jobs on the machine neither flatter nor hurt it).

    Measures read + JPEG decode + crop/flip + patchify + layout, i.e. everything the training
    step waits for. Runs `seconds` of wall time if given, else `batches` batches, after `warmup`.
    For tools/bench_data.py, beside the online loader's number.
    """
    loader = build_row_loader(cfg, rank=0, world_size=1, micro_batch_size=micro_batch_size, rows_root=rows_root)
    try:
        for _ in range(warmup):
            next(loader)
        w0, c0 = time.perf_counter(), time.process_time()
        tokens = n = 0
        while (time.perf_counter() - w0 < seconds) if seconds is not None else n < batches:
            tokens += next(loader).tokens.numel()
            n += 1
        cpu = time.process_time() - c0
    finally:
        loader.close()
    return tokens / max(cpu, 1e-9)
