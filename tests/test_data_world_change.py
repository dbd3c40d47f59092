"""The loader's position across a change of the number of ranks (pretrain/data/world_change.py).

Reference: an uninterrupted run of W ranks. The changed run is the same W ranks for a few steps,
then `reshard_loader_states` to W' ranks, then W' ranks until every rank has read past the
newest epoch the old ranks had reached (E). Checked, per source and document of epochs <= E:
tokens placed in rows plus tokens still waiting in the packing buffers equal the uninterrupted
run's (each document exactly once and whole, none skipped, buffered pieces carried over), and
no document placed whole before the change is read again.
Both directions (2 -> 1 and 1 -> 2), and the caption tail filler's hand-over.
Run:  python -m pytest tests/test_data_world_change.py -q
"""
from __future__ import annotations

from collections import Counter

import pytest

MICRO, GLOBAL, CHANGE_AT, MAX_STEPS = 2, 8, 5, 120


def _cfg(root, *extra):
    from pretrain.config import load_config
    return load_config("pretrain/configs/demo.yaml", [f"data.root={root}", "data.seq_len=128",
                                                      "data.weights=[1,1,1]", *extra]).data


def _loaders(cfg, world):
    from pretrain.data.loader import build_train_loader
    return [build_train_loader(cfg, rank=r, world_size=world, micro_batch_size=MICRO, global_batch_size=GLOBAL)
            for r in range(world)]


def _recording(loader, placed: Counter):
    """Count the tokens each (source, epoch, document) gets in rows (row streams, not fill)."""
    inner = loader.next_row

    def next_row(s):
        row = inner(s)
        for p in row:
            if not (p.ref and p.ref[0] == "fill"):
                placed[(p.source_idx, p.ref[0], loader.piece_key(p))] += p.length
        return row
    loader.next_row = next_row
    return loader


def _step(loaders):
    for loader in loaders:
        for _ in range(GLOBAL // (MICRO * len(loaders))):
            next(loader)


def _read_past(loaders, newest: dict) -> bool:
    """Every rank's cursor has passed the epochs <= newest[source] and nothing handed over is left."""
    return all(not st.carry and st.epoch + st.index // st.per_rank > newest[s]
               for loader in loaders for s, st in loader.streams.items())


def _run_past(loaders, newest):
    for _ in range(MAX_STEPS):
        if _read_past(loaders, newest):
            return
        _step(loaders)
    raise AssertionError(f"epochs {newest} not read in {MAX_STEPS} steps")


def _buffered(loaders) -> Counter:
    """Tokens of each (source, epoch, document) still waiting in the packing buffers."""
    out = Counter()
    for loader in loaders:
        for s, packer in loader.packers.items():
            for p in packer.buffer:
                out[(s, p.ref[0], loader.piece_key(p))] += p.length + sum(q.length for q in (p.rest or []))
    return out


def _newest_epochs(loaders) -> dict:
    return {s: max(ld.streams[s].epoch + ld.streams[s].index // ld.streams[s].per_rank for ld in loaders)
            for s in loaders[0].streams}


@pytest.mark.parametrize("old_world,new_world", [(2, 1), (1, 2)])
def test_documents_placed_once_across_the_change(tiny_demo, old_world, new_world):
    from pretrain.data.world_change import docs_per_epoch, reshard_loader_states

    cfg = _cfg(tiny_demo)
    before, after = Counter(), Counter()
    old = [_recording(ld, before) for ld in _loaders(cfg, old_world)]
    for _ in range(CHANGE_AT):
        _step(old)
    newest = _newest_epochs(old)
    states, summary = reshard_loader_states([ld.state_dict() for ld in old], new_world, micro_batch_size=MICRO,
                                            docs_per_epoch=docs_per_epoch(cfg))
    new = [_recording(ld, after) for ld in _loaders(cfg, new_world)]
    for ld, st in zip(new, states):
        ld.load_state_dict(st)
    assert summary["buffered_pieces_moved"] > 0  # the change really happened mid-buffer
    _run_past(new, newest)

    ref = Counter()
    uninterrupted = [_recording(ld, ref) for ld in _loaders(cfg, old_world)]
    _run_past(uninterrupted, newest)

    def upto(c):
        return {k: v for k, v in c.items() if k[1] <= newest[k[0]]}
    # placed in rows + still buffered, per document: the whole document in both runs
    changed = upto(before + after + _buffered(new))
    assert changed == upto(ref + _buffered(uninterrupted))
    assert set(changed) and min(e for _, e, _ in changed) == 0
    # nothing placed whole before the change is read again: a document placed on both sides of
    # the change was in a packing buffer at the change (its first pieces placed, the rest buffered)
    split = {k for k in upto(before) if k in upto(after)}
    assert len(split) <= summary["buffered_pieces_moved"]
    # the mixture continues at the same global step (its quotas are global)
    accum = GLOBAL // (MICRO * new_world)
    assert all(st["mixture"]["micro_steps"] == CHANGE_AT * accum for st in states)


def test_filler_position_is_handed_over(tiny_demo):
    from pretrain.data.world_change import docs_per_epoch, reshard_loader_states

    cfg = _cfg(tiny_demo, "data.fill_rows_of=[caption]")
    old = _loaders(cfg, 2)
    for _ in range(CHANGE_AT):
        _step(old)
    states, summary = reshard_loader_states([ld.state_dict() for ld in old], 1, micro_batch_size=MICRO,
                                            docs_per_epoch=docs_per_epoch(cfg))
    assert summary["fill_remainders_dropped"] == int(old[1].filler.pos is not None)
    (new,) = _loaders(cfg, 1)
    new.load_state_dict(states[0])
    assert new.filler.pos is None or new.filler.offset == old[0].filler.offset
    for _ in range(3):
        _step([new])


def test_handed_over_position_same_with_worker_processes(tiny_demo):
    """The re-split state gives the same batches with data.num_workers=2 (workers.py) as without."""
    import torch
    from pretrain.data.world_change import docs_per_epoch, reshard_loader_states

    cfg = _cfg(tiny_demo)
    old = _loaders(cfg, 2)
    for _ in range(CHANGE_AT):
        _step(old)
    states, _ = reshard_loader_states([ld.state_dict() for ld in old], 1, micro_batch_size=MICRO,
                                      docs_per_epoch=docs_per_epoch(cfg))
    batches = {}
    for workers in (0, 2):
        (new,) = _loaders(_cfg(tiny_demo, f"data.num_workers={workers}"), 1)
        new.load_state_dict(states[0])
        batches[workers] = [next(new) for _ in range(6)]
        new.close()
    for a, b in zip(batches[0], batches[2]):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.patches, b.patches)
