"""OBELICS as released, end to end and offline: documents whose images are URLs go through
`tools/prepare_data.py interleaved --download` (img2dataset, cached by URL) into shards.

A local HTTP server on 127.0.0.1 (started and stopped here) serves good JPEG/PNG images, a broken
JPEG, 404s, an HTML page served as 200 and an image with `X-Robots-Tag: noai`. Every correctly
served image must land exactly once per slot, in its document at its position (found by its
colour), every failure must be counted under its reason, documents keep their text and order,
and a second run must fetch nothing. Also: the tar layout whose KEY.json still holds the URLs
with the downloaded files beside it.
    .venv/bin/python -m pytest tests/test_ingest_download.py -q
"""
import http.server
import io
import json
import os
import random
import threading
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pretrain.data.ingest.driver import IngestConfig, run_ingest
from pretrain.data.ingest.interleaved import read_interleaved
from tests.ingest_helpers import WORDS, encoded, make_tokenizer, prepare_data_here, read_shards, write_tar


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def _colour(i):
    return (37 * i + 20) % 256, (91 * i + 200) % 256, (53 * i + 90) % 256


class _Server:
    """Serves `routes` {path: (status, headers, body)}; counts requests per path."""

    def __init__(self, routes):
        hits = self.hits = Counter()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                hits[self.path] += 1
                status, headers, body = routes.get(self.path, (404, {"Content-Type": "text/plain"}, b"no"))
                self.send_response(status)
                for k, v in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


def _read_docs(root, source):
    """{key: [("t", text) | ("i", mean RGB)]} over all shards of a source (each key once)."""
    return {k: [("t", p) if isinstance(p, str) else ("i", imgs[p].reshape(-1, 3).mean(axis=0)) for p in parts]
            for k, (parts, imgs) in read_shards(root, source).items()}


def _same_doc(got, expected, colours):
    """got: [("t", text) | ("i", mean RGB)]; expected: [("t", text) | ("i", colour index)]."""
    assert [k for k, _ in got] == [k for k, _ in expected], (got, expected)
    for (kind, g), (_, e) in zip(got, expected):
        if kind == "t":
            assert g == e
        else:
            assert np.abs(g - np.asarray(colours[e], dtype=np.float64)).max() < 6, (g, colours[e])


def test_obelics_release_downloads_once_and_keeps_documents(tmp_path, tok_path, monkeypatch):
    rng = random.Random(7)
    colours = [_colour(i) for i in range(6)]
    good = {f"/img/good{i}.{'png' if i % 2 else 'jpg'}": i for i in range(6)}
    routes = {p: (200, {"Content-Type": "image/png" if p.endswith("png") else "image/jpeg"},
                  encoded(colours[i], fmt="PNG" if p.endswith("png") else "JPEG")) for p, i in good.items()}
    buf = io.BytesIO()  # a noisy JPEG cut in its scan data: a valid header, a broken image
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (160, 200, 3), dtype=np.uint8)).save(buf, "JPEG")
    routes["/img/broken.jpg"] = (200, {"Content-Type": "image/jpeg"}, buf.getvalue()[: len(buf.getvalue()) // 2])
    routes["/img/page.jpg"] = (200, {"Content-Type": "text/html"}, b"<html><body>not found</body></html>")
    routes["/img/optout.jpg"] = (200, {"Content-Type": "image/jpeg", "X-Robots-Tag": "noai"},
                                 encoded((9, 9, 9)))
    with _Server(routes) as srv:
        U = {name: srv.base + path for name, path in
             [*[(f"g{i}", p) for p, i in good.items()], ("broken", "/img/broken.jpg"),
              ("html", "/img/page.jpg"), ("optout", "/img/optout.jpg"), ("404a", "/img/gone1.jpg"),
              ("404b", "/img/gone2.jpg")]}

        def words(n=4):
            return " ".join(rng.choice(WORDS) for _ in range(n))
        # Each document: a list of ("t", text) / ("i", url name); the expected output drops the
        # failed image slots and keeps everything else in order.
        docs = [
            [("t", words()), ("i", "g0"), ("t", words()), ("i", "404a"), ("t", words()), ("i", "g1")],
            [("i", "html"), ("t", words())],
            [("t", words()), ("i", "broken"), ("i", "g2")],
            [("i", "404b"), ("t", words()), ("i", "404a")],  # every image fails: kept as text
            [("i", "optout"), ("t", words()), ("i", "g3"), ("i", "g4")],
            [("t", words(6))],
            [("i", "g5")],  # an image-only document
            [("t", words()), ("i", "g0")],  # a URL used by two documents: fetched once
        ]
        rows = [{"images": [U[v] if k == "i" else None for k, v in d],
                 "metadata": json.dumps([{"document_url": f"https://example.org/{j}"} if k == "i" else None
                                         for k, v in d]),
                 "general_metadata": json.dumps({"url": f"https://example.org/{j}"}),
                 "texts": [v if k == "t" else None for k, v in d]} for j, d in enumerate(docs)]
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "obelics-00000.parquet")
        out, cache = tmp_path / "out", tmp_path / "cache"
        args = ["interleaved", "--input", tmp_path / "obelics-00000.parquet", "--output", out, "--tokenizer",
                tok_path, "--download", "--download-cache", cache, "--download-threads", 4,
                "--download-timeout", 5, "--download-retries", 0, "--image-size", 32, "--min-image-size", 8]
        for var in ("no_proxy", "NO_PROXY"):  # a proxy from the environment must not see 127.0.0.1
            monkeypatch.setenv(var, "127.0.0.1,localhost")
        first = prepare_data_here(*args)
        assert first.returncode == 0, first.stderr[-3000:]
        summary = json.loads(first.stdout)
        hits_after_first = Counter(srv.hits)
        assert all(hits_after_first[u[len(srv.base):]] == 1 for u in U.values()), hits_after_first
        assert summary["download"]["urls"] == len(U) and summary["download"]["cached"] == 0
        assert summary["download"]["fetched"] == 7  # 6 good + the broken JPEG (judged at ingest)
        assert summary["dropped_images"] == {"download_http_404": 3, "download_not_an_image": 1,
                                             "download_opted_out": 1, "corrupt_image": 1}
        assert summary["skipped"] == {} and summary["samples"] == len(docs) == summary["read"]
        assert summary["images"] == 7  # g0..g5, g0 twice

        failed = {"broken", "html", "optout", "404a", "404b"}
        got = _read_docs(str(out), "interleaved")
        assert set(got) == {f"obelics-00000_row{j}" for j in range(len(docs))}
        for j, d in enumerate(docs):
            expected = [(k, int(v[1:]) if k == "i" else v) for k, v in d if not (k == "i" and v in failed)]
            _same_doc(got[f"obelics-00000_row{j}"], expected, colours)

        # A second run fetches nothing, even with its ingest redone (done-file removed): every
        # image comes from the cache and every failure is remembered.
        os.remove(out / ".ingest" / "interleaved" / "00000.json")
        again = prepare_data_here(*args)
        assert again.returncode == 0, again.stderr[-3000:]
        second = json.loads(again.stdout)
        assert second["download"] == {"urls": len(U), "cached": len(U), "fetched": 0, "failed": {},
                                      "shards_failed": 0}
        assert (second["dropped_images"], second["images"]) == (summary["dropped_images"], summary["images"])
        assert _read_docs(str(out), "interleaved").keys() == got.keys()
        assert srv.hits == hits_after_first


def test_tar_with_release_urls_and_downloaded_files_beside(tmp_path, tok_path):
    """KEY.json still holds the release's URLs; the downloads sit beside it as KEY.{i}.jpg, with
    i the position in `images` (or, in another tar, the image's number among the images)."""
    colours = [_colour(i) for i in range(4)]
    url = "https://example.org/img{}.jpg".format
    by_position = {"texts": ["red cat", None, "big house", None], "images": [None, url(0), None, url(1)]}
    by_number = {"texts": [None, "old tree", None], "images": [url(2), None, url(3)]}
    members = [("a.json", json.dumps(by_position).encode()), ("a.1.jpg", encoded(colours[0])),
               ("a.3.jpg", encoded(colours[1])),
               ("b.json", json.dumps(by_number).encode()), ("b.0.jpg", encoded(colours[2])),
               ("b.1.jpg", encoded(colours[3])),
               ("c.json", json.dumps({"texts": ["a dog", None], "images": [None, url(9)]}).encode())]
    write_tar(tmp_path / "docs.tar", members)
    cfg = IngestConfig(output=str(tmp_path / "out"), tokenizer=tok_path, source="interleaved", image_size=32,
                       min_image_size=8, progress=False)
    stats = run_ingest([str(tmp_path / "docs.tar")], cfg, read_interleaved)
    got = _read_docs(cfg.output, "interleaved")
    _same_doc(got["docs_a"], [("t", "red cat"), ("i", 0), ("t", "big house"), ("i", 1)], colours)
    _same_doc(got["docs_b"], [("i", 2), ("t", "old tree"), ("i", 3)], colours)
    _same_doc(got["docs_c"], [("t", "a dog")], colours)  # no file beside it, no download cache
    assert stats.images == 4 and stats.dropped_images == {"remote_image": 1}


def test_failed_downloads_set_to_null_keep_their_documents(tmp_path, tok_path):
    """Users' own glue marks a failed download with null text and null image at its position:
    that slot goes (counted), never the whole document."""
    docs = [{"texts": ["red cat", None, "big house"], "images": [None, None, None]},
            {"texts": [None, "old tree"], "images": [None, None]},
            {"texts": ["a", "b"], "images": ["x.jpg", None]}]  # text and image at once: misaligned
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    cfg = IngestConfig(output=str(tmp_path / "out"), tokenizer=tok_path, source="interleaved", progress=False)
    stats = run_ingest([str(tmp_path / "d.jsonl")], cfg, read_interleaved)
    got = {k: [t for _, t in v] for k, v in _read_docs(cfg.output, "interleaved").items()}
    assert got == {"d_1": ["red cat", "big house"], "d_2": ["old tree"]}
    assert stats.dropped_images == {"empty_slot": 2} and stats.skipped == {"bad_alignment": 1}
