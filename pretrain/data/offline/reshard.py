"""Resharding: rewrite a shard set into N shards per (source, split) balanced by tokens.

    python tools/reshard.py --input data/demo --output data/demo_8 --num-shards 8 [--workers 2]

Works on both shard kinds, detected from the manifest:
  * ingest output (documents): a document weighs text tokens + images x image_tokens + 2
    (BOS/EOS), i.e. the tokens it occupies in a row (image_tokens = n_patches + 2 markers; 258
    for the paper's 224-px images and 14-px patches);
  * packed rows (tools/pack_shards.py): a row weighs seq_len, the compute it costs (every row
    is a full row), so shards get equal row counts (to one row); the manifest also reports the
    non-padding tokens per shard.
Why by tokens: loaders deal shards or ranges of documents to ranks and workers; balancing
sample counts leaves a shard of long interleaved documents with several times the work of one
of short captions, and the rank that reads it becomes the straggler every step.

Algorithm: longest-processing-time greedy (heaviest sample first, into the currently lightest
shard). It keeps max - min <= the largest sample at every step, and far less in practice since
the last samples placed are the smallest. Inside an output shard samples keep their input
order (locality, and a stable, deterministic result). Samples are copied member by member
(json and JPEG bytes untouched). The manifest's `balance` says, per (source, split), the
largest and smallest shard in tokens, their relative difference and the bound it meets.

Parallel: input shards are scanned by a worker pool, output shards written by a worker pool
(tar to .tmp then rename: an output shard that exists is complete and a restart skips it). An
unreadable input shard is reported and counted in the manifest's `errors` and left out.
"""
from __future__ import annotations

import heapq
import json
import multiprocessing as mp
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

from pretrain.data.offline.rows import (AtomicTarWriter, RowManifest, RowShardInfo, TarIndex, is_row_manifest,
                                load_row_manifest, write_row_manifest)
from pretrain.data.shards import ShardInfo, load_manifest

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    def tqdm(it=None, **_):
        return it


@dataclass
class SampleEntry:
    """One sample (document or row) as scanned: where it is, what it weighs, what it counts."""
    path: str  # absolute input shard path
    key: str
    weight: int  # tokens used for balancing
    counts: dict  # per-sample manifest counts (samples/text_tokens/images or rows/tokens/...)


@dataclass
class ReshardReport:
    output: str
    kind: str  # "documents" | "packed_rows"
    balance: dict = field(default_factory=dict)  # per "source/split": see balance_stats
    shards_written: int = 0
    shards_skipped: int = 0
    shards_failed: list[str] = field(default_factory=list)
    unreadable_inputs: list[str] = field(default_factory=list)
    renamed_keys: int = 0  # duplicate keys within a (source, split) made unique
    seconds: float = 0.0


def balance_partition(weights: list[int], n: int) -> list[list[int]]:
    """Split items into n bins of near-equal total weight (LPT greedy).

    Items are placed heaviest first (ties: earlier item first), each into the lightest bin (ties:
    lowest bin), so the result is deterministic; each bin lists its items in input order.
    Invariant: max bin - min bin <= the largest weight.
    """
    if n < 1:
        raise ValueError(f"balance_partition: need n >= 1 bins, got {n}")
    heap = [(0, b) for b in range(n)]
    bins: list[list[int]] = [[] for _ in range(n)]
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        load, b = heapq.heappop(heap)
        bins[b].append(i)
        heapq.heappush(heap, (load + weights[i], b))
    return [sorted(b) for b in bins]


def balance_stats(loads: list[int], largest_item: int, balance_by: str) -> dict:
    """What the manifest states about one group's balance."""
    hi, lo = max(loads), min(loads)
    tol = max(0.02 * hi, largest_item)
    return {"shards": len(loads), "balance_by": balance_by, "max_tokens": hi, "min_tokens": lo,
            "mean_tokens": round(sum(loads) / len(loads), 1),
            "imbalance": round((hi - lo) / hi, 6) if hi else 0.0,  # (max - min) / max
            "largest_sample_tokens": largest_item,
            "within_bound": (hi - lo) <= tol}  # < 2% of max, or one sample, whichever is larger


# -- scanning -----------------------------------------------------------------------------------
def _scan(args: tuple) -> tuple[str, Optional[list[SampleEntry]], Optional[str]]:
    """Worker: weigh every sample of one input shard; (path, entries, error)."""
    path, expected, kind, image_tokens, seq_len = args
    try:
        r = TarIndex(path)
        out = []
        try:
            if len(r.keys) != expected:  # a truncated tar often still opens: the count catches it
                raise ValueError(f"holds {len(r.keys)} samples, the manifest says {expected} (truncated?)")
            for key in r.keys:
                d = r.read_json(key)
                if kind == "packed_rows":
                    n_img = len(d["images"])
                    for k in range(n_img):
                        if f"img{k}.jpg" not in r.members[key]:
                            raise ValueError(f"row {key} lacks img{k}.jpg")
                    counts = {"rows": 1, "tokens": int(d["tokens"]), "padding": seq_len - int(d["tokens"]),
                              "images": n_img, "pieces": len(d["pieces"]), "source": d["source"]}
                    out.append(SampleEntry(path, key, seq_len, counts))
                else:
                    parts = d["parts"]
                    text = sum(len(p) for p in parts if not isinstance(p, int))
                    n_img = max([p + 1 for p in parts if isinstance(p, int)] + [0])
                    for k in range(n_img):
                        if f"img{k}.jpg" not in r.members[key]:
                            raise ValueError(f"sample {key} lacks img{k}.jpg")
                    counts = {"samples": 1, "text_tokens": text, "images": n_img}
                    weight = text + sum(1 for p in parts if isinstance(p, int)) * image_tokens + 2
                    out.append(SampleEntry(path, key, weight, counts))
        finally:
            r.close()
        return path, out, None
    except Exception as e:
        return path, None, f"{type(e).__name__}: {e}"


# -- writing ------------------------------------------------------------------------------------
def _write(args: tuple) -> tuple[str, Optional[str]]:
    """Worker: copy samples member by member into one output tar; (path, error)."""
    out_path, samples = args  # samples: [(input path, key, output key)]
    readers: dict[str, TarIndex] = {}
    w = None
    try:
        w = AtomicTarWriter(out_path)
        for path, key, new_key in samples:
            if path not in readers:
                readers[path] = TarIndex(path)
            r = readers[path]
            for ext in r.members[key]:  # tar order of the sample's members (json first as written)
                w.add(f"{new_key}.{ext}", r.read_member(key, ext))
        w.close()
        return out_path, None
    except Exception as e:
        if w is not None:
            w.abort()
        return out_path, f"{type(e).__name__}: {e}"
    finally:
        for r in readers.values():
            r.close()


def _pool(workers: int):
    return mp.get_context("fork").Pool(workers) if workers > 1 else None


def _map(pool, fn, items, desc: str, progress: bool) -> list:
    it = pool.imap(fn, items) if pool is not None else map(fn, items)
    return list(tqdm(it, total=len(items), desc=desc, disable=not progress, unit="shard"))


def reshard(input_dir: str, output: str, num_shards: int, *, image_tokens: int = 258, workers: int = 1,
            progress: bool = True) -> ReshardReport:
    """Rewrite the shard set at input_dir into num_shards shards per (source, split) at output."""
    t0 = time.time()
    if num_shards < 1:
        raise ValueError(f"reshard: num_shards must be >= 1, got {num_shards}")
    if os.path.abspath(input_dir) == os.path.abspath(output):
        raise ValueError("reshard: output must differ from input (shards are read while written)")
    kind = "packed_rows" if is_row_manifest(input_dir) else "documents"
    if kind == "packed_rows":
        rm = load_row_manifest(input_dir)
        shard_list = [(rm.abspath(s), s.source, s.split, s.rows) for s in rm.shards]
        seq_len, sources, tok_path = rm.seq_len, rm.sources, rm.tokenizer_path
    else:
        dm = load_manifest(input_dir)
        shard_list = [(dm.abspath(s), s.source, s.split, s.samples) for s in dm.shards]
        seq_len, sources, tok_path = 0, dm.sources, dm.tokenizer_path
    os.makedirs(output, exist_ok=True)
    fp = {"input": os.path.abspath(input_dir), "kind": kind, "num_shards": num_shards,
          "image_tokens": image_tokens if kind == "documents" else None}
    fp_path = os.path.join(output, "reshard_config.json")
    if os.path.exists(fp_path):
        with open(fp_path) as f:
            old = json.load(f)
        if old != fp:
            raise ValueError(f"reshard: {output} holds the output of another reshard ({old}); "
                             f"use a new output directory or delete it")
    else:
        with open(fp_path, "w") as f:
            json.dump(fp, f, indent=1)
    report = ReshardReport(output=output, kind=kind)

    pool = _pool(workers)
    scanned = _map(pool, _scan, [(p, n, kind, image_tokens, seq_len) for p, _, _, n in shard_list], "scan", progress)
    groups: dict[tuple[str, str], list[SampleEntry]] = {}
    for (path, source, split, _), (_, entries, err) in zip(shard_list, scanned):
        if err is not None:
            report.unreadable_inputs.append(f"{path}: {err}")
            print(f"reshard: ERROR: unreadable input shard {path} ({err}); skipped")
            continue
        groups.setdefault((source, split), []).extend(entries)

    jobs, planned = [], []  # planned: (rel path, source, split, [entries])
    for (source, split) in sorted(groups):
        entries = groups[(source, split)]
        seen: dict[str, int] = {}
        new_keys = []
        for e in entries:  # keys must stay unique inside an output shard
            n = seen.get(e.key, 0)
            seen[e.key] = n + 1
            new_keys.append(e.key if n == 0 else f"{e.key}_dup{n}")
            report.renamed_keys += n > 0
        bins = [b for b in balance_partition([e.weight for e in entries], num_shards) if b]
        loads = [sum(entries[i].weight for i in b) for b in bins]
        by = "rows x seq_len" if kind == "packed_rows" else f"text tokens + images x {image_tokens} + 2"
        report.balance[f"{source}/{split}"] = balance_stats(loads, max(e.weight for e in entries), by)
        if kind == "packed_rows":
            real = [sum(entries[i].counts["tokens"] for i in b) for b in bins]
            report.balance[f"{source}/{split}"]["nonpadding_tokens_max_min"] = [max(real), min(real)]
        for j, b in enumerate(bins):
            rel = f"{source}/{split}-{j:05d}.tar"
            planned.append((rel, source, split, [entries[i] for i in b]))
            out_path = os.path.join(output, rel)
            if os.path.exists(out_path):
                report.shards_skipped += 1
            else:
                jobs.append((out_path, [(entries[i].path, entries[i].key, new_keys[i]) for i in b]))
    for path, err in _map(pool, _write, jobs, "write", progress):
        if err is None:
            report.shards_written += 1
        else:
            report.shards_failed.append(f"{path}: {err}")
            print(f"reshard: ERROR: could not write {path} ({err}); left out of the manifest")
    if pool is not None:
        pool.close()
        pool.join()
    failed = {p.split(": ")[0] for p in report.shards_failed}

    shutil.copyfile(tok_path, os.path.join(output, "tokenizer.model"))
    errors = report.unreadable_inputs + report.shards_failed
    if kind == "packed_rows":
        infos = []
        for rel, source, split, ents in planned:
            if os.path.join(output, rel) in failed:
                continue
            info = RowShardInfo(path=rel, source=source, split=split)
            for e in ents:
                for k in ("rows", "tokens", "padding", "images", "pieces"):
                    setattr(info, k, getattr(info, k) + e.counts[k])
            infos.append(info)
        extra = {k: v for k, v in rm.extra.items() if k not in ("balance", "errors")}
        write_row_manifest(RowManifest(root=os.path.abspath(output), seq_len=rm.seq_len, image_size=rm.image_size,
                                       patch_size=rm.patch_size, n_patches=rm.n_patches, tokenizer="tokenizer.model",
                                       sources=list(sources), shards=infos,
                                       extra={**extra, "balance": report.balance, "errors": errors}))
    else:
        infos = []
        for rel, source, split, ents in planned:
            if os.path.join(output, rel) in failed:
                continue
            infos.append(ShardInfo(path=rel, source=source, split=split,
                                   samples=len(ents), text_tokens=sum(e.counts["text_tokens"] for e in ents),
                                   images=sum(e.counts["images"] for e in ents)))
        # The ingest manifest format (load_manifest reads tokenizer/sources/shards and ignores
        # the rest), plus what resharding did.
        d = {"tokenizer": "tokenizer.model", "sources": list(sources), "shards": [asdict(s) for s in infos],
             "balance": report.balance, "errors": errors}
        tmp = os.path.join(output, "manifest.json.tmp")
        with open(tmp, "w") as f:
            json.dump(d, f, indent=1)
        os.replace(tmp, os.path.join(output, "manifest.json"))
    report.seconds = time.time() - t0
    return report
