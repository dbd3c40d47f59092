"""The training loader's position when a run resumes on a different number of ranks.

`reshard_loader_states(old_states, new_world, ...)` turns the W saved per-rank loader states
(TrainLoader.state_dict) into W' states that continue the same global position:

- A document is named world-independently by (epoch, g): its position g in the epoch's order
  over all ranks (SourceStream.order gives rank r the slice [r·P, (r+1)·P), P = N // W).
- Every document the old ranks had not read yet, up to the newest epoch any old rank had
  reached (E), is handed over: the rest of each old rank's slice in its current epoch, whole
  slices of later epochs up to E for ranks that were behind, and any documents an earlier change
  had handed over and were still unread. These ranges are split into W' contiguous runs of near
  equal size, one per new rank (`carry`: read before the rank's own cursor). New ranks start
  their own slices (P' = N // W') at epoch E + 1.
- The packing buffers (documents read but not yet, or only partly, placed in rows) move whole:
  every buffered piece, with the tokens already cut off it, goes to new rank r mod W'.
- The caption tail filler (DataConfig.fill_rows_of) is handled the same way for its own cursor;
  its current document (partly used) continues on new rank r for r < W'. When shrinking, the
  unused rest of the current fill document of old ranks r >= W' is dropped (counted in the
  summary: at most W - W' fill documents, a few hundred tokens each).
- The mixture (global, identical on every rank) keeps its totals; its micro-step counter
  becomes global steps x the new accumulation.

Guarantee: across the change, every document of epochs <= E is placed exactly once (as in an
uninterrupted run on the old number of ranks, whose epoch split it keeps; the N mod W documents
that split leaves out of each epoch stay out), nothing consumed before is read again, and every
buffered piece is placed exactly once. Not kept: the order of rows after the change, and the
augmentation draws of handed-over documents (keyed by global position instead of rank index).
"""
from __future__ import annotations

import copy


def carried_index(g: int) -> int:
    """How a stream names the carried document at global position g (SourceStream.read_document)."""
    return -1 - g


def global_position(index: int, rank: int, per_rank: int) -> int:
    return -1 - index if index < 0 else rank * per_rank + index


def _pending(cursors: list[dict], per_rank: int) -> tuple[list[list[int]], int]:
    """The unread documents of all old ranks as global ranges, and the newest epoch reached."""
    norm = []
    for c in cursors:
        e, i = int(c["epoch"]), int(c["index"])
        norm.append((e + i // per_rank, i % per_rank))
    newest = max(e for e, _ in norm)
    ranges = [list(map(int, r)) for c in cursors for r in c.get("carry", [])]
    for epoch in range(min(e for e, _ in norm), newest + 1):
        for r, (e, i) in enumerate(norm):
            if epoch >= e:
                lo = r * per_rank + (i if epoch == e else 0)
                if lo < (r + 1) * per_rank:
                    ranges.append([epoch, lo, (r + 1) * per_rank])
    return ranges, newest


def _split(ranges: list[list[int]], parts: int) -> list[list[list[int]]]:
    """Cut a list of [epoch, lo, hi) ranges into `parts` contiguous runs of near-equal length."""
    total = sum(hi - lo for _, lo, hi in ranges)
    bounds = [k * total // parts for k in range(parts + 1)]
    out: list[list[list[int]]] = [[] for _ in range(parts)]
    pos = 0
    for epoch, lo, hi in ranges:
        for k in range(parts):
            a, b = max(lo, lo + bounds[k] - pos), min(hi, lo + bounds[k + 1] - pos)
            if a < b:
                out[k].append([epoch, a, b])
        pos += hi - lo
    return out


def _global_ref(ref: list, rank: int, per_rank: int) -> list:
    return [ref[0], carried_index(global_position(int(ref[1]), rank, per_rank)), *ref[2:]]


def _stream(cursors: list[dict], docs: int, old_world: int, new_world: int) -> tuple[list[dict], int]:
    """New cursors (epoch, index, carry) for one stream; and how many documents were handed over."""
    per_rank = docs // old_world
    ranges, newest = _pending(cursors, per_rank)
    runs = _split(ranges, new_world)
    return [{"epoch": newest + 1, "index": 0, "carry": runs[k]} for k in range(new_world)], \
        sum(hi - lo for _, lo, hi in ranges)


def reshard_loader_states(old: list[dict], new_world: int, *, micro_batch_size: int,
                          docs_per_epoch: dict[str, int]) -> tuple[list[dict], dict]:
    """W old TrainLoader states -> `new_world` new ones, and a summary of what moved.

    docs_per_epoch: train documents per source (the manifest's counts; SourceStream's N). The
    global batch size must stay the same (it defines a step)."""
    old_world = len(old)
    if old_world == 0 or any(s["config"]["rank"] != r for r, s in enumerate(old)):
        raise ValueError(f"reshard_loader_states: need the states of ranks 0..{old_world - 1} in order")
    cfg0 = old[0]["config"]
    if cfg0["world_size"] != old_world:
        raise ValueError(f"reshard_loader_states: states of {old_world} ranks, saved with world size "
                         f"{cfg0['world_size']}")
    gbs = cfg0["global_batch_size"]
    if gbs % (new_world * micro_batch_size):
        raise ValueError(f"reshard_loader_states: global batch {gbs} is not divisible by {new_world} ranks x "
                         f"micro-batch {micro_batch_size}")
    old_accum = gbs // (old_world * cfg0["micro_batch_size"])
    new_accum = gbs // (new_world * micro_batch_size)
    global_steps = old[0]["mixture"]["micro_steps"] // old_accum
    new = []
    for k in range(new_world):
        st = copy.deepcopy({key: v for key, v in old[0].items() if key not in ("streams", "filler")})
        st["config"].update(rank=k, world_size=new_world, micro_batch_size=micro_batch_size)
        st["step"] = global_steps * new_accum
        st["mixture"] = {"micro_steps": global_steps * new_accum, "done": list(old[0]["mixture"]["done"])}
        st["streams"], st["filler"] = {}, None
        new.append(st)
    summary = {"documents_handed_over": {}, "buffered_pieces_moved": 0, "fill_remainders_dropped": 0}
    for source in old[0]["streams"]:
        cursors = [s["streams"][source] for s in old]
        per_rank = docs_per_epoch[source] // old_world
        streams, moved = _stream(cursors, docs_per_epoch[source], old_world, new_world)
        for k in range(new_world):
            streams[k]["buffer"] = []
        for r, c in enumerate(cursors):
            streams[r % new_world]["buffer"] += [_global_ref(ref, r, per_rank) for ref in c["buffer"]]
            summary["buffered_pieces_moved"] += len(c["buffer"])
        for k in range(new_world):
            new[k]["streams"][source] = streams[k]
        summary["documents_handed_over"][source] = moved
    if old[0].get("filler") is not None:
        fill_source = cfg0["fill_source"]
        fillers = [s["filler"] for s in old]
        per_rank = docs_per_epoch[fill_source] // old_world
        streams, moved = _stream(fillers, docs_per_epoch[fill_source], old_world, new_world)
        for k in range(new_world):
            f = fillers[k] if k < old_world else {"pos": None, "offset": 0}
            pos = None if f["pos"] is None else [int(f["pos"][0]), carried_index(
                global_position(int(f["pos"][1]), k, per_rank))]
            new[k]["filler"] = {**streams[k], "pos": pos, "offset": int(f["offset"]) if pos else 0}
        summary["fill_remainders_dropped"] = sum(f["pos"] is not None for f in fillers[new_world:])
        summary["documents_handed_over"][f"{fill_source} (fill)"] = moved
    return new, summary


def docs_per_epoch(cfg) -> dict[str, int]:
    """Train documents per source of a DataConfig (SourceStream's N, from the manifest)."""
    from pretrain.data.shards import load_manifest

    manifest = load_manifest(cfg.root)
    return {src: sum(int(s.samples) for s in manifest.select(src, "train")) for src in cfg.sources}
