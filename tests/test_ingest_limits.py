"""Bounded lengths, confined paths, a held-out minimum (issue 16, points 5, 6 and 7).

  * a caption longer than max_caption_tokens is truncated (counted); a text or interleaved
    document costing more than max_doc_tokens is split at paragraph boundaries into documents
    that each fit, with nothing lost or reordered (counted);
  * image paths in records resolve only under the input's folder or --image-root: `..`,
    absolute paths and symlinks leading elsewhere are refused and counted;
  * a small source still gets val_min_docs held-out documents (exactly, by key position), and
    the summary says what was reserved.
    .venv/bin/python -m pytest tests/test_ingest_limits.py -q
"""
import json
import math
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pretrain.data.ingest.captions import read_captions
from pretrain.data.ingest.driver import IngestConfig, clean_key, run_ingest
from pretrain.data.ingest.interleaved import read_interleaved
from pretrain.data.ingest.text import read_text
from pretrain.data.shards import load_manifest, split_position
from pretrain.data.tokenizer import Tokenizer
from tests.ingest_helpers import encoded, make_tokenizer, read_shards, sentence, write_tar


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def _cfg(out, tok_path, source, **kw):
    d = dict(output=str(out), tokenizer=tok_path, source=source, image_size=32, min_image_size=8, progress=False)
    d.update(kw)
    return IngestConfig(**d)


def test_long_caption_truncated(tmp_path, tok_path):
    rng = random.Random(0)
    tok = Tokenizer(tok_path)
    long_cap, short_cap = sentence(rng, 400), "red cat"
    write_tar(tmp_path / "c.tar", [("a.jpg", encoded()), ("a.txt", long_cap.encode()),
                                   ("b.jpg", encoded()), ("b.txt", short_cap.encode())])
    stats = run_ingest([str(tmp_path / "c.tar")], _cfg(tmp_path / "out", tok_path, "caption",
                                                       max_caption_tokens=50), read_captions)
    got = read_shards(str(tmp_path / "out"), "caption")
    assert got["c_a"][0][1] == tok.decode(tok.encode(long_cap)[:50])
    assert got["c_b"][0][1] == short_cap
    assert stats.truncated_captions == 1 and stats.samples == 2


def _raw_docs(root, source):
    """{key: parts as stored (token lists / image indices)}."""
    from pretrain.data.shards import ShardReader
    out = {}
    for info in load_manifest(root).shards:
        if info.source == source:
            r = ShardReader(os.path.join(root, info.path))
            out.update({s.key: s.doc["parts"] for s in r})
            r.close()
    return out


def _squeeze(text):
    return "".join(text.split())


def test_long_documents_split_at_paragraphs(tmp_path, tok_path):
    rng = random.Random(1)
    paras = [sentence(rng, rng.randint(5, 20)) for _ in range(30)]
    huge = sentence(rng, 300)  # one paragraph longer than the bound: cut every max tokens
    text = "\n\n".join(paras[:15] + [huge] + paras[15:])
    (tmp_path / "t.jsonl").write_text(json.dumps({"id": "big", "text": text}) + "\n"
                                      + json.dumps({"id": "small", "text": "old tree"}) + "\n")
    M = 64
    stats = run_ingest([str(tmp_path / "t.jsonl")], _cfg(tmp_path / "out", tok_path, "text", max_doc_tokens=M,
                                                       val_fraction=0.0), read_text)
    docs = {k: v[0] for k, v in read_shards(str(tmp_path / "out"), "text").items()}
    raw = _raw_docs(str(tmp_path / "out"), "text")
    pieces = [k for k in docs if k.startswith("t_big")]
    assert len(pieces) > 1 and stats.split_documents == 1 and stats.split_added == len(pieces) - 1
    order = ["t_big"] + [clean_key(f"t_big-part{i}") for i in range(1, len(pieces))]
    assert all(sum(len(p) for p in raw[k]) <= M for k in order)  # every piece fits
    # In order, the pieces hold the whole text (nothing lost, nothing reordered) ...
    texts = ["".join(docs[k]) for k in order]
    assert _squeeze("".join(texts)) == _squeeze(text)
    # ... and the cuts fall between paragraphs: every paragraph that fits the bound alone lies
    # within one piece (longer ones are cut every M tokens, like the huge one).
    tok = Tokenizer(tok_path)
    fitting = [p for p in paras if len(tok.encode(p)) <= M]
    assert len(fitting) > 20
    for p in fitting:
        assert any(_squeeze(p) in _squeeze(t) for t in texts), p
    assert docs["t_small"] == ["old tree"]
    assert stats.read == stats.samples - stats.split_added + sum(stats.skipped.values())


def test_long_interleaved_document_split_keeps_images_in_order(tmp_path, tok_path):
    rng = random.Random(2)
    colours = [(30 * i + 10, 200 - 20 * i, 90) for i in range(5)]
    texts, images, members = [], [], []
    for i in range(5):
        texts += ["\n\n".join(sentence(rng, 8) for _ in range(3)), None]
        images += [None, f"{i}.jpg"]
        members.append((f"d.{i}.jpg", encoded(colours[i])))
    write_tar(tmp_path / "i.tar", [("d.json", json.dumps({"texts": texts, "images": images}).encode())] + members)
    stats = run_ingest([str(tmp_path / "i.tar")], _cfg(tmp_path / "out", tok_path, "interleaved",
                                                       max_doc_tokens=40, image_tokens=16, val_fraction=0.0),
                       read_interleaved)
    got = read_shards(str(tmp_path / "out"), "interleaved")
    order = ["i_d"] + [clean_key(f"i_d-part{i}") for i in range(1, len(got))]
    seq = []
    for k in order:
        parts, imgs = got[k]
        assert len(imgs) == sum(isinstance(p, int) for p in parts)
        for p in parts:
            if isinstance(p, int):
                seq.append(("i", imgs[p].reshape(-1, 3).mean(0)))
            elif seq and seq[-1][0] == "t":  # a text cut between two pieces: join it back
                seq[-1] = ("t", seq[-1][1] + p)
            else:
                seq.append(("t", p))
    assert [k for k, _ in seq] == ["t", "i"] * 5
    for j, (_, c) in enumerate(s for s in seq if s[0] == "i"):
        assert max(abs(a - b) for a, b in zip(c, colours[j])) < 6
    assert [_squeeze(t) for k, t in seq if k == "t"] == [_squeeze(t) for t in texts if t]
    assert stats.split_documents == 1 and stats.images == 5 and len(got) > 2


def test_image_paths_confined(tmp_path, tok_path):
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (data / "img" / "ok.jpg").write_bytes(encoded())
    (tmp_path / "secret" / "s.jpg").write_bytes(encoded())
    os.symlink(tmp_path / "secret" / "s.jpg", data / "img" / "link.jpg")
    rows = [{"key": "ok", "image": "img/ok.jpg", "caption": "red cat"},
            {"key": "up", "image": "../secret/s.jpg", "caption": "big dog"},
            {"key": "abs", "image": str(tmp_path / "secret" / "s.jpg"), "caption": "old tree"},
            {"key": "link", "image": "img/link.jpg", "caption": "small house"}]
    pq.write_table(pa.Table.from_pylist(rows), data / "p.parquet")
    hf = [{"key": "struct", "image": {"bytes": None, "path": "/etc/hostname"}, "caption": "a river"},
          {"key": "fine", "image": {"bytes": None, "path": "img/ok.jpg"}, "caption": "a river"}]
    pq.write_table(pa.Table.from_pylist(hf), data / "hf.parquet")
    stats = run_ingest([str(data / "p.parquet"), str(data / "hf.parquet")],
                       _cfg(tmp_path / "o1", tok_path, "caption"), read_captions)
    assert set(read_shards(str(tmp_path / "o1"), "caption")) == {"p_ok", "hf_fine"}
    assert stats.skipped == {"image_path_outside_root": 4}
    # With --image-root, relative paths resolve there, and only there.
    rows2 = [{"key": "s", "image": "s.jpg", "caption": "red cat"},
             {"key": "o", "image": str(data / "img" / "ok.jpg"), "caption": "big dog"}]
    pq.write_table(pa.Table.from_pylist(rows2), data / "q.parquet")
    stats2 = run_ingest([str(data / "q.parquet")], _cfg(tmp_path / "o2", tok_path, "caption",
                                                        image_root=str(tmp_path / "secret")), read_captions)
    assert set(read_shards(str(tmp_path / "o2"), "caption")) == {"q_s"}
    assert stats2.skipped == {"image_path_outside_root": 1}


def test_small_source_gets_the_minimum_held_out(tmp_path, tok_path):
    rng = random.Random(3)
    n, m = 60, 10
    (tmp_path / "s.jsonl").write_text("".join(json.dumps({"id": f"d{i}", "text": sentence(rng)}) + "\n"
                                              for i in range(n)))
    cfg = _cfg(tmp_path / "out", tok_path, "text", val_fraction=0.01, val_min_docs=m)
    stats = run_ingest([str(tmp_path / "s.jsonl")], cfg, read_text)
    man = load_manifest(cfg.output)
    val = sum(s.samples for s in man.shards if s.split == "val")
    # Brute force: the m keys with the smallest positions are exactly the val split.
    keys = [f"s_d{i}" for i in range(n)]
    smallest = set(sorted(keys, key=split_position)[:m])
    got_val = {k for info in man.shards if info.split == "val"
               for k in read_shards_keys(os.path.join(cfg.output, info.path))}
    assert val == m == stats.val_samples and got_val == smallest
    assert stats.heldout["documents_counted"] == n and stats.heldout["val_min_docs"] == m
    assert sum(split_position(k) < 0.01 for k in keys) < m  # the fraction alone would give fewer
    # At most half of a tiny source is held out; a large one keeps the plain fraction.
    small = _cfg(tmp_path / "out2", tok_path, "text", val_fraction=0.01, val_min_docs=m)
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"id": f"e{i}", "text": "red cat"}) + "\n"
                                              for i in range(7)))
    assert run_ingest([str(tmp_path / "t.jsonl")], small, read_text).val_samples == 3
    big = _cfg(tmp_path / "out3", tok_path, "text", val_fraction=0.5, val_min_docs=m)
    st = run_ingest([str(tmp_path / "s.jsonl")], big, read_text)
    assert st.heldout["effective_val_fraction"] == 0.5 and st.heldout["documents_counted"] is None
    assert math.isclose(st.val_samples, sum(split_position(k) < 0.5 for k in keys))


def read_shards_keys(path):
    from pretrain.data.shards import ShardReader
    r = ShardReader(path)
    keys = [s.key for s in r]
    r.close()
    return keys
