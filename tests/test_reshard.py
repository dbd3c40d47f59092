"""Resharding (tools/reshard.py): N shards balanced by tokens, for ingest output and packed rows.

Acceptance 2 of issue 8: on very uneven inputs the largest and smallest output shard differ by
< 2% of tokens (or one document, whichever is larger), and the manifest says so.
    .venv/bin/python -m pytest tests/test_reshard.py -q
"""
import json
import random
import subprocess

import pytest

from pretrain.data.offline.pack import pack_shards
from pretrain.data.offline.reshard import balance_partition, reshard
from pretrain.data.offline.row_loader import RowLoader
from pretrain.data.offline.rows import RowShardReader, load_row_manifest
from pretrain.data.shards import ShardReader, ShardWriter, load_manifest, write_manifest
from tests.helpers import PYTHON, REPO
from tests.test_offline_pack import _cfg

IMAGE_TOKENS = 6  # tiny images: keeps the test's documents small


@pytest.fixture(scope="module")
def uneven(tmp_path_factory, tiny_demo):
    """Ingest-format shards of wildly uneven size: 600, 40, 3 and 1 documents of 1..900 tokens
    (long-tailed), plus a truncated shard; the demo's tokenizer is reused."""
    root = tmp_path_factory.mktemp("uneven")
    rng = random.Random(0)
    demo = ShardReader(str(next(iter(sorted((tiny_demo / "caption").glob("train-*.tar"))))))
    img = demo.read(demo.keys[0]).images[0]  # one real JPEG, reused
    demo.close()
    infos = []
    for shard, n in enumerate([600, 40, 3, 1]):
        w = ShardWriter(str(root), "interleaved", "train", max_samples=10_000, tag=f"in{shard}")
        for i in range(n):
            n_tok = min(900, int(rng.paretovariate(1.2) * 20))
            parts = [[rng.randrange(6, 400) for _ in range(n_tok)]]
            imgs = [img] * rng.randrange(0, 3)
            parts += list(range(len(imgs)))
            w.write(f"doc{shard}x{i:05d}", parts, imgs)
        w.close()
        infos += w.infos
    good = (root / infos[0].path).read_bytes()
    (root / "interleaved" / "train-broken.tar").write_bytes(good[:5000])
    infos.append(type(infos[0])(path="interleaved/train-broken.tar", source="interleaved", split="train", samples=9))
    (root / "tokenizer.model").write_bytes((tiny_demo / "tokenizer.model").read_bytes())
    write_manifest(str(root), "tokenizer.model", ["interleaved"], infos)
    return root


def _weights(path):
    """{key: tokens} of every readable document under a manifest, weighed as reshard weighs them
    (the deliberately broken shard of `uneven` is left out)."""
    m = load_manifest(str(path))
    m.shards = [s for s in m.shards if "broken" not in s.path]
    out = {}
    for info in m.shards:
        r = ShardReader(m.abspath(info))
        for k in r.keys:
            parts = r.read_json(k)["parts"]
            out[k] = sum(len(p) for p in parts if isinstance(p, list)) + IMAGE_TOKENS * sum(
                isinstance(p, int) for p in parts) + 2
        r.close()
    return m, out


def test_balance_partition_invariant():
    rng = random.Random(1)
    for _ in range(50):
        w = [int(rng.paretovariate(1.0) * 10) for _ in range(rng.randrange(1, 300))]
        n = rng.randrange(1, 9)
        bins = balance_partition(w, n)
        assert sorted(i for b in bins for i in b) == list(range(len(w)))
        loads = [sum(w[i] for i in b) for b in bins]
        assert max(loads) - min(loads) <= max(w)
        assert all(b == sorted(b) for b in bins)  # input order kept inside a shard


def test_reshard_documents_balanced_by_tokens(uneven, tmp_path):
    out = tmp_path / "out"
    cmd = [PYTHON, str(REPO / "tools/reshard.py"), "--input", str(uneven), "--output", str(out),
           "--num-shards", "4", "--image-tokens", str(IMAGE_TOKENS), "--workers", "2"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0, p.stderr
    assert "unreadable input shard" in p.stdout and "train-broken.tar" in p.stdout
    m, weights = _weights(out)
    _, before = _weights(uneven)
    assert weights == before  # every good document exactly once (keys unique), unchanged
    assert len(m.shards) == 4
    loads = []
    for info in m.shards:
        r = ShardReader(m.abspath(info))
        loads.append(sum(weights[k] for k in r.keys))
        assert len(r.keys) == info.samples
        r.close()
    # The input shards' token counts differ by ~1000x; the output's by < 2% or one document.
    assert (max(loads) - min(loads)) < max(0.02 * max(loads), max(weights.values()))
    assert (max(loads) - min(loads)) / max(loads) < 0.02
    d = json.loads((out / "manifest.json").read_text())
    b = d["balance"]["interleaved/train"]
    assert (b["max_tokens"], b["min_tokens"]) == (max(loads), min(loads)) and b["within_bound"]
    assert len(d["errors"]) == 1 and "train-broken.tar" in d["errors"][0]
    # Restart: everything is there, nothing is rewritten.
    before_bytes = {i.path: (out / i.path).read_bytes() for i in m.shards}
    r = reshard(str(uneven), str(out), 4, image_tokens=IMAGE_TOKENS, progress=False)
    assert r.shards_written == 0 and r.shards_skipped == 4
    assert {i.path: (out / i.path).read_bytes() for i in m.shards} == before_bytes


def test_reshard_packed_rows(tiny_demo, tmp_path):
    cfg = _cfg(tiny_demo)
    rows = tmp_path / "rows"
    pack_shards([str(tiny_demo)], str(rows), cfg, rows_per_shard=70, progress=False)  # uneven: 70 + tail
    out = tmp_path / "re"
    rep = reshard(str(rows), str(out), 3, workers=2, progress=False)
    assert rep.kind == "packed_rows" and not rep.shards_failed
    src, dst = load_row_manifest(str(rows)), load_row_manifest(str(out))
    for source in cfg.sources:
        counts = [i.rows for i in dst.select(source)]
        assert len(counts) == 3 and max(counts) - min(counts) <= 1  # tokens = rows x seq_len
        assert sum(counts) == sum(i.rows for i in src.select(source))
        assert dst.extra["balance"][f"{source}/train"]["within_bound"]

        def contents(m):
            got = []
            for info in m.select(source):
                r = RowShardReader(m.abspath(info), m.seq_len)
                got += [(k, json.dumps(r.read_json(k), sort_keys=True), r.read(k).images) for k in r.keys]
                r.close()
            return sorted(got)
        assert contents(src) == contents(dst)  # the same rows, images byte for byte
    assert dst.extra["per_source"] == src.extra["per_source"]
    loader = RowLoader(cfg, rank=0, world_size=2, micro_batch_size=4, rows_root=str(out))
    for _ in range(3):
        next(loader).validate()
