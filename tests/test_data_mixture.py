"""Exact mixture per global batch, exact resume with another worker count, no starving rank,
caption-row tail filling.
    .venv/bin/python -m pytest tests/test_data_mixture.py -q
"""
import json
import os

import pytest
import torch

from pretrain.data import DataConfig, build_train_loader
from pretrain.data.mixture import MixtureSchedule, batch_quotas
from pretrain.data.shards import ShardWriter, write_manifest


def _cfg(root, **kw):
    d = dict(root=str(root), seq_len=96, image_size=16, patch_size=8, pack_buffer=8)
    d.update(kw)
    return DataConfig(**d)


def _same(a, b):
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in
               ["tokens", "patches", "is_patch", "doc_ids", "image_ids", "position_ids", "labels", "source_ids"])


def test_quotas_exact_when_integral_and_never_drift_otherwise():
    done = [0, 0, 0]
    for g in range(50):
        q = batch_quotas([0.45, 0.45, 0.10], 40, done, g)
        assert q == [18, 18, 4]
        done = [d + x for d, x in zip(done, q)]
    done = [0, 0, 0]
    for g in range(200):  # 16 rows: 7.2 / 7.2 / 1.6 per batch
        q = batch_quotas([0.45, 0.45, 0.10], 16, done, g)
        assert sum(q) == 16 and all(abs(x - w * 16) < 1 for x, w in zip(q, [0.45, 0.45, 0.10]))
        done = [d + x for d, x in zip(done, q)]
        assert all(abs(d - w * 16 * (g + 1)) < 1 for d, w in zip(done, [0.45, 0.45, 0.10]))
    assert batch_quotas([0.5, 0.0, 0.5], 7, [0, 0, 0], 0)[1] == 0


def test_schedule_slots_cover_the_global_batch():
    W, mbs, accum = 3, 4, 2
    scheds = [MixtureSchedule([0.45, 0.45, 0.10], world_size=W, rank=r, micro_batch_size=mbs, grad_accum=accum)
              for r in range(W)]
    for _ in range(5):
        rows = [s for _ in range(accum) for sch in scheds for s in sch.next_micro_batch()]
        counts = [rows.count(s) for s in range(3)]
        assert sum(counts) == 24 and all(abs(c - w * 24) < 1 for c, w in zip(counts, [0.45, 0.45, 0.10]))


def test_every_global_batch_holds_the_configured_rows(tiny_demo):
    # 2 ranks x 2 accumulation steps x 5 rows = 20 rows per global batch: 9 / 9 / 2 exactly.
    cfg = _cfg(tiny_demo, weights=[0.45, 0.45, 0.10])
    loaders = [build_train_loader(cfg, rank=r, world_size=2, micro_batch_size=5, global_batch_size=20)
               for r in range(2)]
    for _ in range(8):
        counts = torch.zeros(3, dtype=torch.long)
        for _ in range(2):
            for ld in loaders:
                b = next(ld)
                counts += torch.bincount(b.source_ids[:, 0].long(), minlength=3)
                assert (b.source_ids == b.source_ids[:, :1]).all()  # one source per row
        assert counts.tolist() == [9, 9, 2]
    with pytest.raises(ValueError, match="global_batch_size"):
        build_train_loader(cfg, rank=0, world_size=2, micro_batch_size=5, global_batch_size=15)


@pytest.mark.parametrize("workers_before,workers_after", [(2, 0), (0, 3)])
def test_resume_with_another_worker_count(tiny_demo, workers_before, workers_after):
    kw = dict(fill_rows_of=["caption"], seq_len=128)
    ref = build_train_loader(_cfg(tiny_demo, num_workers=1, **kw), rank=1, world_size=2, micro_batch_size=3,
                             global_batch_size=12)
    want = [next(ref) for _ in range(24)]
    run = build_train_loader(_cfg(tiny_demo, num_workers=workers_before, **kw), rank=1, world_size=2,
                             micro_batch_size=3, global_batch_size=12)
    for i in range(9):  # mid-epoch, mid-global-batch (accumulation 2)
        assert _same(next(run), want[i]), i
    state = json.loads(json.dumps(run.state_dict()))
    assert state["filler"]["offset"] >= 0 and len(json.dumps(state)) < 20000
    run.close()
    new = build_train_loader(_cfg(tiny_demo, num_workers=workers_after, **kw), rank=1, world_size=2,
                             micro_batch_size=3, global_batch_size=12)
    new.load_state_dict(state)
    for i in range(9, 24):
        assert _same(next(new), want[i]), i
    assert max(st["epoch"] for st in new.state_dict()["streams"].values()) >= 1  # crossed an epoch boundary
    new.close()


def test_caption_rows_tail_filled_with_text(tiny_demo):
    kw = dict(weights=[1, 0, 0], seq_len=100, pack_buffer=1)  # no best fit: tails are long
    plain = build_train_loader(_cfg(tiny_demo, **kw), rank=0, world_size=1, micro_batch_size=4)
    filled = build_train_loader(_cfg(tiny_demo, fill_rows_of=["caption"], fill_min_tokens=4, **kw),
                                rank=0, world_size=1, micro_batch_size=4)
    for _ in range(5):
        a, b = next(plain), next(filled)
        b.validate()
        assert b.source_ids[:, 0].eq(0).all()  # still caption rows
        assert filled.last_stats["tokens/text"] > 0
        assert filled.last_stats["padding"] <= 4 * 3  # only tails < fill_min_tokens stay padding
        # The caption documents are the same as without filling; the tail is the difference.
        cap_a = a.tokens[a.source_ids == 0]
        cap_b = b.tokens[(b.source_ids == 0) & ~((b.tokens == 0) & ~b.is_patch)]
        assert torch.equal(cap_a[(cap_a != 0) | a.is_patch[a.source_ids == 0]], cap_b)


def _uniform_text_corpus(root, tok_path, sizes, seq_len):
    """One source ('text') in len(sizes) shards; every document exactly fills one row."""
    infos, k = [], 0
    for i, n in enumerate(sizes):
        w = ShardWriter(str(root), "text", "train", max_samples=n, tag=f"s{i}")
        for _ in range(n):
            w.write(f"doc{k:04d}", [list(range(100 + k % 50, 100 + k % 50 + seq_len - 2))], [])
            k += 1
        w.close()
        infos += w.infos
    write_manifest(str(root), os.path.abspath(tok_path), ["text"], infos)
    return k


def test_three_shards_two_ranks_two_workers_no_starvation(tiny_demo, tmp_path):
    n_docs = _uniform_text_corpus(tmp_path, os.path.join(tiny_demo, "tokenizer.model"), [7, 2, 4], 32)
    cfg = DataConfig(root=str(tmp_path), sources=["text"], weights=[1.0], seq_len=32, image_size=16,
                     patch_size=8, pack_buffer=2, decode_threads=2)
    per_rank = n_docs // 2  # 6 documents per rank and epoch, whatever the shard sizes
    seen, epochs_at = [], []
    for rank in range(2):
        ld = build_train_loader(cfg, rank=rank, world_size=2, micro_batch_size=2)
        keys, batches = [], 0
        while True:
            next(ld)
            batches += 1
            keys += [k for row in ld.last_keys for k in row]
            if len(keys) >= per_rank:
                break
        assert len(set(keys)) == per_rank  # a full epoch, nothing twice
        epochs_at.append(batches)
        next(ld)
        assert ld.streams[0].epoch == 1  # the next batch starts epoch 1: no hang, no early stop
        seen.append(set(keys))
        ld.close()
    assert epochs_at[0] == epochs_at[1] == per_rank // 2  # equal batch counts per rank
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == n_docs - n_docs % 2
    with pytest.raises(ValueError, match="fewer than the 16 ranks"):
        build_train_loader(cfg, rank=0, world_size=16, micro_batch_size=1)
