"""Shards, manifest, train loader (determinism, exact resume, rank split, mixture), eval batches.

Generates a tiny demo data set in a temp dir (does not need data/demo).
    .venv/bin/python -m pytest tests/test_data_loader.py -q
"""
import json
import os

import pytest
import torch

from pretrain.batch import IGNORE_INDEX
from pretrain.data import (DataConfig, Document, build_eval_batches, build_train_loader, load_manifest,
                           load_tokenizer, pack_documents)
from pretrain.data.corpora.demo import COLOURS, SHAPES, DemoSizes, make_demo_data, probe_examples
from pretrain.data.shards import ShardReader, split_of

SIZES = DemoSizes(caption=240, interleaved=60, text=60, val_fraction=0.2,
                  shard_samples={"caption": 50, "interleaved": 12, "text": 12})


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo"))
    make_demo_data(out, seed=0, sizes=SIZES, vocab_size=400, verbose=False)
    return out


def _cfg(root, **kw):
    d = dict(root=root, seq_len=96, image_size=16, patch_size=8, pack_buffer=8)
    d.update(kw)
    return DataConfig(**d)


def _same(a, b):
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in
               ["tokens", "patches", "is_patch", "doc_ids", "image_ids", "position_ids", "labels", "source_ids"])


def test_manifest_and_shards(root):
    m = load_manifest(root)
    assert m.sources == ["caption", "interleaved", "text"]
    assert os.path.isfile(m.tokenizer_path)
    for src in m.sources:
        assert len(m.select(src, "train")) >= 3 and len(m.select(src, "val")) >= 1
    total = 0
    for info in m.shards:
        r = ShardReader(m.abspath(info))
        assert len(r.keys) == info.samples
        n_img = n_tok = 0
        for s in r:
            assert s.doc["source"] == info.source and split_of(s.key, SIZES.val_fraction) == info.split
            n_img += len(s.images)
            n_tok += sum(len(p) for p in s.doc["parts"] if isinstance(p, list))
            assert all(img[:2] == b"\xff\xd8" for img in s.images)  # JPEG
        assert (n_img, n_tok) == (info.images, info.text_tokens)
        total += info.samples
    assert total == SIZES.caption + SIZES.interleaved + SIZES.text


def test_demo_is_deterministic(root, tmp_path):
    make_demo_data(str(tmp_path), seed=0, sizes=SIZES, vocab_size=400, verbose=False)
    for info in load_manifest(root).shards:
        with open(os.path.join(root, info.path), "rb") as f1, open(tmp_path / info.path, "rb") as f2:
            assert f1.read() == f2.read(), info.path


def test_train_batches_valid_and_deterministic(root):
    cfg = _cfg(root)
    a = build_train_loader(cfg, rank=0, world_size=1, micro_batch_size=4)
    b = build_train_loader(cfg, rank=0, world_size=1, micro_batch_size=4)
    for _ in range(6):
        x, y = next(a), next(b)
        x.validate()
        assert x.shape == (4, 96) and x.patches.shape[1] == 3 * 8 * 8
        assert _same(x, y)
        # Images sit between <boi> and <eoi>; labels never point at patches.
        tok = a.tokenizer
        assert int((x.tokens == tok.boi_id).sum()) * 4 == int(x.is_patch.sum())
        assert not (x.labels[x.labels != IGNORE_INDEX] == tok.pad_id).any()
    c = build_train_loader(_cfg(root, seed=1), rank=0, world_size=1, micro_batch_size=4)
    assert not _same(next(c), next(build_train_loader(cfg, rank=0, world_size=1, micro_batch_size=4)))


def test_resume_is_exact_across_epochs(root):
    cfg = _cfg(root)
    ref = build_train_loader(cfg, rank=1, world_size=2, micro_batch_size=4)
    want = [next(ref) for _ in range(30)]
    assert max(st.epoch for st in ref.streams.values()) >= 1  # crossed an epoch boundary
    for stop in [0, 7, 19]:
        run = build_train_loader(cfg, rank=1, world_size=2, micro_batch_size=4)
        for _ in range(stop):
            next(run)
        state = json.loads(json.dumps(run.state_dict()))  # must survive JSON
        assert len(json.dumps(state)) < 20000
        new = build_train_loader(cfg, rank=1, world_size=2, micro_batch_size=4)
        new.load_state_dict(state)
        for i in range(stop, 30):
            assert _same(next(new), want[i]), (stop, i)
    other = build_train_loader(_cfg(root, seq_len=128), rank=1, world_size=2, micro_batch_size=4)
    with pytest.raises(ValueError, match="seq_len"):
        other.load_state_dict(state)


@pytest.mark.parametrize("world_size", [2, 8])  # 8 > shards per source: document-level split
def test_ranks_get_disjoint_data(root, world_size):
    cfg = _cfg(root, pack_buffer=2)
    seen = []
    for rank in range(2):
        loader = build_train_loader(cfg, rank=rank, world_size=world_size, micro_batch_size=2)
        keys = set()
        for _ in range(3):
            next(loader)
            keys |= {k for row in loader.last_keys for k in row}
        assert all(st.epoch == 0 for st in loader.streams.values())
        seen.append(keys)
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_mixture_proportions(root):
    cfg = _cfg(root, weights=[0.45, 0.45, 0.10])
    loader = build_train_loader(cfg, rank=0, world_size=1, micro_batch_size=5)
    counts = torch.zeros(3)
    n_rows = 0
    for _ in range(40):
        x = next(loader)
        counts += torch.bincount(x.source_ids[:, 0].long(), minlength=3).float()
        n_rows += x.shape[0]
        # A row holds one source (padding carries the row's source too).
        assert (x.source_ids == x.source_ids[:, :1]).all()
    assert torch.allclose(counts / n_rows, torch.tensor([0.45, 0.45, 0.10]), atol=0.02)
    only_text = build_train_loader(_cfg(root, weights=[0, 0, 1]), rank=0, world_size=1, micro_batch_size=3)
    assert (next(only_text).source_ids == 2).all()


def test_eval_batches_same_count_on_ranks(root):
    cfg = _cfg(root)
    tok = load_tokenizer(cfg)
    for source in cfg.sources:
        per_rank = [build_eval_batches(cfg, source, rank=r, world_size=2, micro_batch_size=3, max_batches=100)
                    for r in range(2)]
        assert len(per_rank[0]) == len(per_rank[1]) > 0
        n_docs = 0
        for batches in per_rank:
            for b in batches:
                b.validate()
                assert (b.source_ids == cfg.sources.index(source)).all()
                n_docs += int((b.tokens == tok.bos_id).sum())
        n_val = sum(s.samples for s in load_manifest(root).select(source, "val"))
        assert n_docs <= n_val  # every rank stops at the common count
        again = build_eval_batches(cfg, source, rank=0, world_size=2, micro_batch_size=3, max_batches=100)
        assert all(_same(x, y) for x, y in zip(again, per_rank[0]))
    one = build_eval_batches(cfg, "caption", rank=0, world_size=1, micro_batch_size=3, max_batches=2)
    assert len(one) == 2


def test_probe_examples_pack(root):
    cfg = _cfg(root)
    ex = probe_examples(root, split="val", n=5)
    assert len(ex) == 5
    assert all(e.colour in COLOURS and e.shape in SHAPES and e.colour in e.caption for e in ex)
    tok = load_tokenizer(cfg)
    docs = [Document("caption", [e.image, tok.encode(e.caption)]) for e in ex]
    batch = pack_documents(docs, cfg, tok, best_fit=False)
    batch.validate()
    assert batch.shape[0] == 5
    assert tok.decode(batch.tokens[0][~batch.is_patch[0]].tolist()).strip() == ex[0].caption


def test_errors_name_the_problem(root, tmp_path):
    with pytest.raises(ValueError, match="manifest"):
        build_train_loader(DataConfig(root=str(tmp_path)), rank=0, world_size=1, micro_batch_size=1)
    m = json.load(open(os.path.join(root, "manifest.json")))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "caption").mkdir()
    (bad / "caption" / "train-00000.tar").write_bytes(b"not a tar at all" * 10)
    m["shards"] = [{"path": "caption/train-00000.tar", "source": "caption", "split": "train",
                    "samples": 1, "text_tokens": 1, "images": 1}]
    m["tokenizer"] = os.path.join(root, "tokenizer.model")
    (bad / "manifest.json").write_text(json.dumps(m))
    loader = build_train_loader(_cfg(str(bad), weights=[1, 0, 0]), rank=0, world_size=1, micro_batch_size=1)
    with pytest.raises(ValueError, match="train-00000.tar"):
        next(loader)


def test_worker_processes_change_nothing(root):
    plain = build_train_loader(_cfg(root), rank=0, world_size=2, micro_batch_size=3)
    want = [next(plain) for _ in range(25)]
    threaded = build_train_loader(_cfg(root, num_workers=2), rank=0, world_size=2, micro_batch_size=3)
    for i in range(10):
        assert _same(next(threaded), want[i]), i
    resumed = build_train_loader(_cfg(root, num_workers=2), rank=0, world_size=2, micro_batch_size=3)
    resumed.load_state_dict(threaded.state_dict())
    for i in range(10, 25):
        assert _same(next(resumed), want[i]), i
    assert max(st["epoch"] for st in resumed.state_dict()["streams"].values()) >= 1
    threaded.close()
    resumed.close()
