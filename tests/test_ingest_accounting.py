"""Ingest is loud instead of silent, and accounts for every sample (issue 16, points 2 and 3).

Loud: a source that ends with no image, or with more than --max-skip-fraction of its samples
skipped, or whose parquet lacks the named column, exits non-zero and says why (the columns it
has, the top reasons). Accounted: zero-byte inputs counted once and alike in every format; a
cut .zst counted as truncated_input with the documents before the cut kept; duplicate keys in a
tar (adjacent or not) counted; distinct documents sharing a URL both kept; keys unique across
input folders; read == written - split_added + skipped in every run.
    .venv/bin/python -m pytest tests/test_ingest_accounting.py -q
"""
import gzip
import json
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from pretrain.data.ingest.captions import read_captions
from pretrain.data.ingest.driver import IngestConfig, run_ingest
from pretrain.data.ingest.text import read_text
from tests.ingest_helpers import (encoded, make_tokenizer, prepare_data_here, read_shards, sentence, summary_of,
                                  write_tar)


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def _cfg(out, tok_path, source, **kw):
    return IngestConfig(output=str(out), tokenizer=tok_path, source=source, image_size=32, min_image_size=8,
                        progress=False, **kw)


def _adds_up(stats):
    assert stats.read == stats.samples - stats.split_added + sum(stats.skipped.values()), stats


def test_wrong_caption_column_fails_naming_the_columns(tmp_path, tok_path):
    rows = [{"key": f"k{i}", "image": encoded(), "text": "red cat"} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    p = prepare_data_here("captions", "--input", tmp_path / "pairs.parquet", "--output", tmp_path / "out",
                     "--tokenizer", tok_path)
    assert p.returncode != 0
    assert "no column 'caption'" in p.stderr and "key, image, text" in p.stderr, p.stderr[-2000:]
    ok = prepare_data_here("captions", "--input", tmp_path / "pairs.parquet", "--output", tmp_path / "out",
                           "--tokenizer", tok_path, "--caption-column", "text", "--image-size", 32,
                           "--min-image-size", 8)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert summary_of(ok)["samples"] == 3 and summary_of(ok)["images"] == 3


def test_image_source_without_images_exits_nonzero_with_reasons(tmp_path, tok_path):
    """OBELICS as released ingested without --download: all text, no image -> a failure that
    names remote_image and the way out."""
    docs = [{"texts": ["red cat", None], "images": [None, f"https://example.org/{i}.jpg"]} for i in range(4)]
    pq.write_table(pa.Table.from_pylist(docs), tmp_path / "obelics.parquet")
    p = prepare_data_here("interleaved", "--input", tmp_path / "obelics.parquet", "--output", tmp_path / "out",
                     "--tokenizer", tok_path)
    assert p.returncode == 2
    assert "no image was written" in p.stderr and "remote_image: 4" in p.stderr and "--download" in p.stderr
    assert summary_of(p)["dropped_images"] == {"remote_image": 4}


def test_skip_fraction_threshold(tmp_path, tok_path):
    members = []
    for i in range(5):  # 2 good pairs, 3 without a caption
        members.append((f"{i:03d}.jpg", encoded()))
        if i < 2:
            members.append((f"{i:03d}.txt", b"red cat"))
    write_tar(tmp_path / "a.tar", members)
    args = ["captions", "--input", tmp_path / "a.tar", "--tokenizer", tok_path, "--image-size", 32,
            "--min-image-size", 8]
    p = prepare_data_here(*args, "--output", tmp_path / "o1")
    assert p.returncode == 2 and "3 of 5 samples (60%) were skipped" in p.stderr
    assert "missing_caption: 3" in p.stderr
    q = prepare_data_here(*args, "--output", tmp_path / "o2", "--max-skip-fraction", 0.7)
    assert q.returncode == 0 and summary_of(q)["samples"] == 2


def test_zero_byte_inputs_counted_once_alike(tmp_path, tok_path):
    for name in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.parquet", "e.tar"):
        (tmp_path / name).write_bytes(b"")
    write_tar(tmp_path / "f.tar", [("x.jpg", encoded()), ("x.txt", b"red cat")])
    caps = run_ingest([str(tmp_path / n) for n in ("d.parquet", "e.tar", "a.jsonl", "f.tar")],
                      _cfg(tmp_path / "o1", tok_path, "caption"), read_captions)
    assert caps.events == {"empty_input": 3} and caps.skipped == {} and caps.samples == 1
    (tmp_path / "g.jsonl").write_text(json.dumps({"text": "red cat"}) + "\n")
    text = run_ingest([str(tmp_path / n) for n in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "g.jsonl")],
                      _cfg(tmp_path / "o2", tok_path, "text"), read_text)
    assert text.events == {"empty_input": 3} and text.skipped == {} and text.samples == 1
    _adds_up(caps)
    _adds_up(text)


def test_cut_zstd_counts_truncated_input_and_keeps_what_came_before(tmp_path, tok_path):
    rng = random.Random(1)
    texts = [sentence(rng, 60) for _ in range(2000)]  # ~530 kB: several 128 kB zstd blocks, as real files
    raw = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    blob = zstandard.ZstdCompressor().compress(raw)
    (tmp_path / "dclm.jsonl.zst").write_bytes(blob[: int(len(blob) * 0.6)])
    # A gzip cut the same way, for comparison: both are one truncated_input event, never bad_json.
    (tmp_path / "dclm2.jsonl.gz").write_bytes(gzip.compress(raw)[: int(len(gzip.compress(raw)) * 0.6)])
    for name in ("dclm.jsonl.zst", "dclm2.jsonl.gz"):
        out = tmp_path / f"out-{name}"
        stats = run_ingest([str(tmp_path / name)], _cfg(out, tok_path, "text", val_fraction=0.0), read_text)
        assert stats.events == {"truncated_input": 1} and stats.skipped == {}, stats
        got = read_shards(str(out), "text")
        n = len(got)
        assert 0 < n < 2000
        stem = name.split(".")[0]
        assert {k: v[0][0] for k, v in got.items()} == {f"{stem}_{i + 1}": texts[i] for i in range(n)}
        _adds_up(stats)


def test_duplicate_tar_keys_adjacent_or_not_are_counted(tmp_path, tok_path):
    members = [("K.jpg", encoded((10, 20, 30))), ("K.txt", b"red cat"),
               ("K.jpg", encoded((200, 20, 30))), ("K.txt", b"big dog"),  # adjacent duplicate
               ("L.jpg", encoded()), ("L.txt", b"old tree"),
               ("K.jpg", encoded()), ("K.txt", b"small house")]  # not adjacent
    write_tar(tmp_path / "dup.tar", members)
    stats = run_ingest([str(tmp_path / "dup.tar")], _cfg(tmp_path / "out", tok_path, "caption"), read_captions)
    got = read_shards(str(tmp_path / "out"), "caption")
    assert {k: v[0][1] for k, v in got.items()} == {"dup_K": "red cat", "dup_L": "old tree"}
    assert abs(int(got["dup_K"][1][0][..., 0].mean()) - 10) < 6  # the first K, not a merge
    assert stats.skipped == {"duplicate_key": 2} and stats.read == 4
    _adds_up(stats)


def test_documents_sharing_a_url_both_survive(tmp_path, tok_path):
    recs = [{"url": "https://a.org/p", "text": "red cat on the tree"},
            {"url": "https://a.org/p", "text": "big dog in the house"},  # another document, same page
            {"url": "https://a.org/p", "text": "red cat on the tree"},  # an exact duplicate
            {"url": "https://b.org/q", "text": "old river"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    stats = run_ingest([str(tmp_path / "d.jsonl")], _cfg(tmp_path / "out", tok_path, "text"), read_text)
    texts = sorted(v[0][0] for v in read_shards(str(tmp_path / "out"), "text").values())
    assert texts == ["big dog in the house", "old river", "red cat on the tree"]
    assert stats.skipped == {"duplicate_key": 1}
    _adds_up(stats)


def test_keys_unique_across_input_folders(tmp_path, tok_path):
    for d, cap in (("a", "red cat"), ("b", "big dog")):
        os.makedirs(tmp_path / "laion" / d)
        write_tar(tmp_path / "laion" / d / "00000.tar",
                  [("000000000.jpg", encoded()), ("000000000.txt", cap.encode())])
    inputs = [str(tmp_path / "laion" / d / "00000.tar") for d in ("a", "b")]
    stats = run_ingest(inputs, _cfg(tmp_path / "out", tok_path, "caption"), read_captions)
    got = read_shards(str(tmp_path / "out"), "caption")
    assert sorted(v[0][1] for v in got.values()) == ["big dog", "red cat"]
    assert stats.samples == 2 and stats.skipped == {}


def test_img2dataset_parquet_output(tmp_path, tok_path):
    """img2dataset --output_format parquet: image bytes in `jpg`, its failures as rows."""
    rows = [{"key": "000000000", "jpg": encoded(), "caption": "red cat", "status": "success",
             "error_message": None, "url": "https://a.org/1.jpg"},
            {"key": "000000001", "jpg": None, "caption": "big dog", "status": "failed_to_download",
             "error_message": "HTTP Error 404: Not Found", "url": "https://a.org/2.jpg"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "00000.parquet")
    stats = run_ingest([str(tmp_path / "00000.parquet")], _cfg(tmp_path / "out", tok_path, "caption",
                                                               image_column="jpg"), read_captions)
    assert {k: v[0][1] for k, v in read_shards(str(tmp_path / "out"), "caption").items()} == \
        {"00000_000000000": "red cat"}
    assert stats.skipped == {"failed_download": 1}
    _adds_up(stats)
