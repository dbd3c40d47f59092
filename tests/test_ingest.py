"""Ingest robustness: every good sample lands in the shards exactly once, every bad one is counted
by reason, nothing crashes, and an interrupted ingest restarts without redoing finished inputs.

All inputs are made here: caption tars (img2dataset layout) with corrupt/truncated JPEGs, a pixel
bomb, missing captions and a truncated tar; caption parquet; text JSONL (plain, gzip, truncated
gzip, zstd) with broken lines; interleaved JSONL and tar (OBELICS layout) with misaligned docs.
    .venv/bin/python -m pytest tests/test_ingest.py -q
"""
import gzip
import io
import json
import os
import random
import tarfile

import pytest
import zstandard
from PIL import Image

from pretrain.data.ingest.driver import IngestConfig, prepare_image, run_ingest
from pretrain.data.ingest.captions import read_captions
from pretrain.data.ingest.interleaved import read_interleaved
from pretrain.data.ingest.text import read_text
from pretrain.data.shards import load_manifest
from pretrain.data.tokenizer import train_tokenizer
from tests.ingest_helpers import read_shards

WORDS = "red green blue cat dog house tree river small big old new the a of on in at".split()


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(400)]
    return train_tokenizer(iter(lines), str(tmp_path_factory.mktemp("tok") / "tok"), vocab_size=300)


def _sentence(rng, n=6):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _img(rng, size=(64, 48), fmt="JPEG", mode="RGB"):
    im = Image.new(mode, size, tuple(rng.randrange(256) for _ in mode))
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _tar(path, members):
    with tarfile.open(path, "w") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def _read_back(root, source):
    """{key: (text, n_images)} over all shards of a source; asserts no key appears twice."""
    out = {}
    for key, (parts, images) in read_shards(root, source).items():
        assert all(min(im.shape[:2]) <= 32 for im in images)
        out[key] = (" ".join(p for p in parts if isinstance(p, str)), len(images))
    return out


def _cfg(tmp_path, tok_path, source, **kw):
    d = dict(output=str(tmp_path / "out"), tokenizer=tok_path, source=source, val_fraction=0.3,
             shard_samples=4, image_size=32, min_image_size=8, max_pixels=1_000_000, progress=False)
    d.update(kw)
    return IngestConfig(**d)


def test_captions_tar_and_parquet(tmp_path, tok_path):
    rng = random.Random(1)
    good, members = {}, []
    for i in range(10):  # good: jpg+txt, png with alpha + json, webp + txt
        key = f"{i:09d}"
        cap = _sentence(rng)
        if i % 3 == 0:
            members += [(f"{key}.jpg", _img(rng)), (f"{key}.txt", cap.encode())]
        elif i % 3 == 1:
            members += [(f"{key}.png", _img(rng, fmt="PNG", mode="RGBA")),
                        (f"{key}.json", json.dumps({"caption": cap, "status": "success"}).encode())]
        else:
            members += [(f"{key}.webp", _img(rng, fmt="WEBP")), (f"{key}.txt", cap.encode())]
        good[f"a_{key}"] = cap
    jpg = _img(rng, size=(128, 128))
    members += [("100.jpg", b"\xff\xd8\xff\xe0 this is not a jpeg" * 20), ("100.txt", b"corrupt jpeg"),
                ("101.jpg", jpg[: len(jpg) // 2]), ("101.txt", b"truncated jpeg"),
                ("102.png", _img(rng, size=(1500, 1000), fmt="PNG")), ("102.txt", b"pixel bomb"),
                ("103.jpg", _img(rng)),  # no caption
                ("104.txt", b"caption without image"),
                ("105.jpg", _img(rng, size=(4, 4))), ("105.txt", b"too small"),
                ("106.jpg", _img(rng)), ("106.json", b"{not json")]
    _tar(tmp_path / "a.tar", members)
    # b.tar: 6 samples, cut in the middle of sample 4's image -> 0..3 good, 4 lost, 5 never seen.
    b_members, b_caps = [], {}
    for i in range(6):
        cap = _sentence(rng)
        b_members += [(f"{i:03d}.jpg", _img(rng, size=(200, 150))), (f"{i:03d}.txt", cap.encode())]
        b_caps[f"b_{i:03d}"] = cap
    _tar(tmp_path / "b.tar", b_members)
    with tarfile.open(tmp_path / "b.tar") as t:
        m = t.getmember("004.jpg")
        cut = m.offset_data + m.size // 2
    data = (tmp_path / "b.tar").read_bytes()[:cut]
    (tmp_path / "b.tar").write_bytes(data)
    good.update({k: v for k, v in b_caps.items() if k < "b_004"})
    # c.parquet: image bytes column, a path column entry, a missing caption.
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "img.jpg").write_bytes(_img(rng))
    rows = [{"key": "p0", "image": {"bytes": _img(rng), "path": None}, "caption": "red cat"},
            {"key": "p1", "image": {"bytes": None, "path": "img.jpg"}, "caption": "green dog"},
            {"key": "p2", "image": {"bytes": _img(rng), "path": None}, "caption": None},
            {"key": "p3", "image": {"bytes": None, "path": "nope.jpg"}, "caption": "blue tree"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    good.update({"c_p0": "red cat", "c_p1": "green dog"})

    cfg = _cfg(tmp_path, tok_path, "caption")
    inputs = [str(tmp_path / n) for n in ("a.tar", "b.tar", "c.parquet")]
    stats = run_ingest(inputs, cfg, read_captions)
    got = _read_back(cfg.output, "caption")
    assert {k: v[0] for k, v in got.items()} == good
    assert all(n == 1 for _, n in got.values())
    assert stats.samples == len(good)
    assert stats.skipped == {"corrupt_image": 2, "too_many_pixels": 1, "missing_caption": 3,
                             "missing_image": 1, "too_small": 1, "truncated_tar": 1, "missing_image_file": 1}
    m = load_manifest(cfg.output)
    assert {s.split for s in m.shards} == {"train", "val"} and m.sources == ["caption"]
    assert sum(s.samples for s in m.shards) == len(good)
    assert sum(s.images for s in m.shards) == len(good)

    # Restart: a finished input is not redone; a lost done-file redoes exactly that input.
    mtimes = {s.path: os.path.getmtime(os.path.join(cfg.output, s.path)) for s in m.shards}
    os.remove(os.path.join(cfg.output, ".ingest", "caption", "00001.json"))
    again = run_ingest(inputs, cfg, read_captions)
    assert again.samples == stats.samples and again.skipped == stats.skipped
    assert _read_back(cfg.output, "caption") == got
    for s in load_manifest(cfg.output).shards:
        same = os.path.getmtime(os.path.join(cfg.output, s.path)) == mtimes[s.path]
        assert same == ("-00001-" not in s.path), s.path
    with pytest.raises(ValueError, match="input list changed"):
        run_ingest(inputs[1:], cfg, read_captions)


def test_text_jsonl_gzip_zstd_and_truncation(tmp_path, tok_path):
    rng = random.Random(2)
    good = {}
    lines = []
    for i in range(8):
        t = _sentence(rng, 20)
        lines.append(json.dumps({"id": f"doc{i}", "text": t}))
        good[f"plain_doc{i}"] = t
    lines[2:2] = ["{broken json", json.dumps({"text": ""}), json.dumps([1, 2]), json.dumps({"txt": "x"})]
    (tmp_path / "plain.jsonl").write_text("\n".join(lines) + "\n")
    gz_lines = []
    for i in range(5):
        t = _sentence(rng, 20)
        gz_lines.append(json.dumps({"text": t}))
        good[f"comp_{i + 1}"] = t
    (tmp_path / "comp.jsonl.gz").write_bytes(gzip.compress(("\n".join(gz_lines) + "\n").encode()))
    zst_text = {}
    for i in range(4):
        zst_text[f"z_{i + 1}"] = _sentence(rng, 20)
    raw = "\n".join(json.dumps({"text": t}) for t in zst_text.values()).encode()
    (tmp_path / "z.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    good.update(zst_text)
    # A gzip cut short: the lines before the damage survive, the run goes on.
    cut_lines = [json.dumps({"text": _sentence(rng, 200)}) for _ in range(200)]
    blob = gzip.compress(("\n".join(cut_lines) + "\n").encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(blob[: len(blob) // 2])

    cfg = _cfg(tmp_path, tok_path, "text", workers=1)
    inputs = sorted(str(p) for p in tmp_path.glob("*.jsonl*"))
    stats = run_ingest(inputs, cfg, read_text)
    got = _read_back(cfg.output, "text")
    cut_keys = {k for k in got if k.startswith("cut_")}
    assert 0 < len(cut_keys) < 200
    assert {k: v[0] for k, v in got.items() if k not in cut_keys} == good
    assert stats.skipped == {"bad_json": 2, "missing_text": 2} and stats.events == {"truncated_input": 1}
    assert stats.samples == len(good) + len(cut_keys)


def test_interleaved_jsonl_and_tar(tmp_path, tok_path):
    rng = random.Random(3)
    (tmp_path / "x.jpg").write_bytes(_img(rng))
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    docs = [
        {"id": "d0", "texts": ["red cat", None, "big house"], "images": [None, "x.jpg", None]},
        {"id": "d1", "texts": [None, "green tree"], "images": ["x.jpg", None]},
        {"id": "d2", "texts": ["a", "b"], "images": [None]},  # misaligned lengths
        {"id": "d3", "texts": ["a", "b"], "images": ["x.jpg", None]},  # two non-null at 0
        {"id": "d4", "texts": ["old river", None, None], "images": [None, "bad.jpg", "missing.jpg"]},
    ]
    (tmp_path / "i.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\nnot json\n")
    members = [("s0.json", json.dumps({"texts": ["small dog", None], "images": [None, "s0.0.jpg"]}).encode()),
               ("s0.0.jpg", _img(rng)),
               ("s1.json", json.dumps({"texts": [None, None, "blue"], "images": [True, True, None]}).encode()),
               ("s1.a.jpg", _img(rng)), ("s1.b.png", _img(rng, fmt="PNG")),
               ("s2.jpg", _img(rng))]  # no document
    _tar(tmp_path / "t.tar", members)
    cfg = _cfg(tmp_path, tok_path, "interleaved")
    stats = run_ingest([str(tmp_path / "i.jsonl"), str(tmp_path / "t.tar")], cfg, read_interleaved)
    got = _read_back(cfg.output, "interleaved")
    assert got == {"i_d0": ("red cat big house", 1), "i_d1": ("green tree", 1), "i_d4": ("old river", 0),
                   "t_s0": ("small dog", 1), "t_s1": ("blue", 2)}
    assert stats.skipped == {"bad_alignment": 2, "bad_json": 1, "missing_document": 1}
    assert stats.dropped_images == {"corrupt_image": 1, "missing_image_file": 1}
    # A second source merges into the same manifest.
    text_cfg = _cfg(tmp_path, tok_path, "text")
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "the old tree"}) + "\n")
    run_ingest([str(tmp_path / "t.jsonl")], text_cfg, read_text)
    assert load_manifest(cfg.output).sources == ["interleaved", "text"]
    assert set(_read_back(cfg.output, "interleaved")) == set(got)


def test_prepare_image_resizes_without_reencoding_when_possible():
    rng = random.Random(4)
    cfg = IngestConfig(output="", tokenizer="", source="caption", image_size=256)
    small = _img(rng, size=(200, 150))
    assert prepare_image(small, cfg) == (small, False)  # kept byte for byte
    big, re_enc = prepare_image(_img(rng, size=(512, 384)), cfg)
    assert re_enc and Image.open(io.BytesIO(big)).size == (341, 256)
    pano, _ = prepare_image(_img(rng, size=(4000, 500)), IngestConfig(output="", tokenizer="", source="c",
                                                                     image_size=256, max_long_side=512))
    assert Image.open(io.BytesIO(pano)).size == (512, 256)


def test_cli_with_worker_processes_and_restart(tmp_path, tok_path):
    """tools/prepare_data.py end to end with 2 worker processes; a rerun redoes nothing."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rng = random.Random(5)
    for f in range(3):
        lines = [json.dumps({"text": _sentence(rng, 10)}) for _ in range(7)] + ["{oops"]
        (tmp_path / f"part{f}.jsonl").write_text("\n".join(lines) + "\n")
    cmd = [sys.executable, os.path.join(root, "tools", "prepare_data.py"), "text", "--input",
           str(tmp_path / "part*.jsonl"), "--output", str(tmp_path / "out"), "--tokenizer", tok_path,
           "--workers", "2", "--shard-samples", "5", "--no-progress"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    assert summary["samples"] == 21 and summary["skipped"] == {"bad_json": 3}
    assert sum(s.samples for s in load_manifest(str(tmp_path / "out")).shards) == 21
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0 and "3 of 3 inputs already done" in again.stderr
    assert json.loads(again.stdout)["samples"] == 21
