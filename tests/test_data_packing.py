"""Packing invariants of pack_documents / build_batch, checked against brute force.

    .venv/bin/python -m pytest tests/test_data_packing.py -q
"""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pretrain.batch import IGNORE_INDEX
from pretrain.data.config import DataConfig
from pretrain.data.images import MEAN, STD, patchify, process_image, to_pil, unpatchify
from pretrain.data.packing import Document, pack_documents

TOK = SimpleNamespace(bos_id=2, eos_id=3, pad_id=0, boi_id=4, eoi_id=5,
                      encode=lambda s: [1000 + ord(c) for c in s])
MARKERS = {2, 3, 4, 5}


def _random_docs(seed: int, n: int, img: int):
    """Docs with globally unique text ids (>= 100000) and random uint8 images."""
    g = np.random.default_rng(seed)
    docs, next_id = [], 100000
    for d in range(n):
        parts = []
        for _ in range(int(g.integers(1, 6))):
            if g.random() < 0.4:
                parts.append(torch.from_numpy(g.integers(0, 256, (3, img, img), dtype=np.uint8)))
            else:
                k = int(g.integers(1, 30))
                parts.append(list(range(next_id, next_id + k)))
                next_id += k
        docs.append(Document(source=["caption", "interleaved", "text"][d % 3], parts=parts, key=f"d{d}"))
    return docs


def _expected_elements(doc, cfg):
    """Brute-force expansion: [('t', id) | ('p', patch tensor)] incl. BOS/EOS and markers."""
    out = [("t", TOK.bos_id)]
    for part in doc.parts:
        if isinstance(part, list):
            out += [("t", t) for t in part]
        else:
            out.append(("t", TOK.boi_id))
            out += [("p", row) for row in process_image(part, cfg.image_size, cfg.patch_size, augment=False)]
            out.append(("t", TOK.eoi_id))
    out.append(("t", TOK.eos_id))
    return out


def test_patchify_matches_brute_force():
    g = np.random.default_rng(0)
    arr = g.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    p = 8
    got = patchify(to_pil(arr), p)
    assert got.shape == (4, 3 * p * p)
    for gy in range(2):
        for gx in range(2):
            for c in range(3):
                for y in range(p):
                    for x in range(p):
                        want = (arr[gy * p + y, gx * p + x, c] / 255.0 - MEAN) / STD
                        assert abs(float(got[gy * 2 + gx, c * p * p + y * p + x]) - want) < 1e-6
    assert torch.equal(unpatchify(got, p), torch.from_numpy(arr))


@pytest.mark.parametrize("best_fit", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_packing_invariants(seed, best_fit):
    cfg = DataConfig(seq_len=24, image_size=16, patch_size=8, pack_buffer=5)  # 4 patches per image
    docs = _random_docs(seed, 25, 16)
    batch = pack_documents(docs, cfg, TOK, best_fit=best_fit)
    batch.validate()
    B, T = batch.shape
    expected = [_expected_elements(d, cfg) for d in docs]
    # Unique text ids -> (doc, position) for locating each packed segment.
    where = {}
    for d, els in enumerate(expected):
        for i, (kind, v) in enumerate(els):
            if kind == "t" and v not in MARKERS:
                where[v] = (d, i)
    patch_iter = iter(batch.patches)
    covered = {d: [] for d in range(len(docs))}
    orphans = []  # segments with no unique text id (e.g. a lone EOS piece, an image-only piece)
    n_images_seen = 0
    for b in range(B):
        row_docs = batch.doc_ids[b].tolist()
        # doc_ids: contiguous runs numbered 0, 1, 2, ... in order.
        runs = []
        for t in range(T):
            if t == 0 or row_docs[t] != row_docs[t - 1]:
                runs.append([t, t + 1])
            else:
                runs[-1][1] = t + 1
        assert [row_docs[s] for s, _ in runs] == list(range(len(runs)))
        img_in_row = 0
        for s, e in runs:
            seg = []
            for t in range(s, e):
                assert int(batch.position_ids[b, t]) == t - s
                if bool(batch.is_patch[b, t]):
                    seg.append(("p", next(patch_iter)))
                else:
                    seg.append(("t", int(batch.tokens[b, t])))
            # image_ids: one new id per contiguous patch span, counted within the row.
            for t in range(s, e):
                if bool(batch.is_patch[b, t]):
                    if t == 0 or not bool(batch.is_patch[b, t - 1]) or batch.doc_ids[b, t - 1] != batch.doc_ids[b, t]:
                        assert int(batch.tokens[b, t - 1]) == TOK.boi_id
                        img_in_row += 1
                    assert int(batch.image_ids[b, t]) == img_in_row - 1
                else:
                    assert int(batch.image_ids[b, t]) == -1
            if e - s == 1 and seg[0] == ("t", TOK.pad_id):
                assert e == T or all(int(batch.tokens[b, u]) == TOK.pad_id for u in range(s, T))
                continue  # padding: its own one-token document
            ids = [(i, v) for i, (k, v) in enumerate(seg) if k == "t" and v not in MARKERS]
            if not ids:
                orphans.append(seg)
                continue
            i, v = ids[0]
            d, pos = where[v]
            start = pos - i
            want = expected[d][start:start + len(seg)]
            assert len(want) == len(seg)
            for (k1, v1), (k2, v2) in zip(seg, want):
                assert k1 == k2
                assert torch.equal(v1, v2) if k1 == "p" else v1 == v2
            covered[d].append((start, start + len(seg)))
            assert int(batch.source_ids[b, s]) == cfg.sources.index(docs[d].source)
        n_images_seen += img_in_row
    assert next(patch_iter, None) is None  # patches: exactly the patch positions, row-major
    # Every token of every document exactly once, pieces in order; orphans fill the gaps exactly.
    gaps = []
    for d, spans in covered.items():
        pos = 0
        for s, e in spans:
            if s != pos:
                gaps.append(expected[d][pos:s])
            pos = e
        if pos != len(expected[d]):
            gaps.append(expected[d][pos:])
    key = lambda seg: [(k, v.sum().item() if k == "p" else v) for k, v in seg]  # noqa: E731
    assert sorted(map(str, map(key, gaps))) == sorted(map(str, map(key, orphans)))
    _check_labels(batch, cfg.image_marker_targets)
    if not best_fit:
        assert B >= len(docs)


def _check_labels(batch, marker_targets: str) -> None:
    """Labels by brute force from the batch contract's definition and data.image_marker_targets."""
    excluded = {"none": {TOK.boi_id, TOK.eoi_id}, "boi": {TOK.eoi_id}, "both": set()}[marker_targets]
    B, T = batch.shape
    for b in range(B):
        for t in range(T):
            nxt_same = t + 1 < T and batch.doc_ids[b, t + 1] == batch.doc_ids[b, t]
            text = nxt_same and not bool(batch.is_patch[b, t + 1])
            want = int(batch.tokens[b, t + 1]) if text and int(batch.tokens[b, t + 1]) not in excluded else IGNORE_INDEX
            assert int(batch.labels[b, t]) == want, (marker_targets, b, t)


@pytest.mark.parametrize("marker_targets", ["none", "boi", "both"])
def test_image_marker_targets_option(marker_targets):
    """Only targets that are markers change with data.image_marker_targets; caption and
    interleaved documents, several images, a split document."""
    cfg = DataConfig(seq_len=24, image_size=16, patch_size=8, image_marker_targets=marker_targets)
    img = torch.zeros((3, 16, 16), dtype=torch.uint8)
    docs = [Document("caption", [img, list(range(100, 104))]),
            Document("interleaved", [list(range(200, 203)), img, list(range(300, 302)), img, [7]]),
            Document("interleaved", [[9] * 20, img, [8]])]
    batch = pack_documents(docs, cfg, TOK, best_fit=False)
    _check_labels(batch, marker_targets)
    cfg.image_marker_targets = "both"
    every = pack_documents(docs, cfg, TOK, best_fit=False)
    assert torch.equal(batch.tokens, every.tokens)
    changed = batch.labels != every.labels
    assert set(every.labels[changed].tolist()) <= {TOK.boi_id, TOK.eoi_id}  # only marker targets differ
    assert bool(changed.any()) == (marker_targets != "both")


def test_split_never_inside_image_and_fits():
    cfg = DataConfig(seq_len=12, image_size=16, patch_size=8, pack_buffer=3)  # image span = 6
    img = torch.zeros((3, 16, 16), dtype=torch.uint8)
    doc = Document("interleaved", [list(range(100, 105)), img, img, list(range(200, 203)), img])
    batch = pack_documents([doc], cfg, TOK, best_fit=False)
    batch.validate()
    for b in range(batch.shape[0]):
        toks = batch.tokens[b].tolist()
        n_boi, n_eoi = toks.count(TOK.boi_id), toks.count(TOK.eoi_id)
        assert n_boi == n_eoi and int(batch.is_patch[b].sum()) == 4 * n_boi


def test_pack_documents_strings_and_min_rows():
    cfg = DataConfig(seq_len=32, image_size=16, patch_size=8)
    img = to_pil(np.full((16, 16, 3), 200, dtype=np.uint8))
    batch = pack_documents([Document("caption", [img, "ab"])], cfg, TOK, best_fit=False, min_rows=3)
    batch.validate()
    assert batch.shape == (3, 32)
    row = batch.tokens[0, :10].tolist()
    assert row[:2] == [TOK.bos_id, TOK.boi_id] and row[6:10] == [TOK.eoi_id, 1000 + ord("a"), 1000 + ord("b"), TOK.eos_id]
    assert batch.labels[0, 5].item() == IGNORE_INDEX  # <eoi> is no target (data.image_marker_targets=none)
    assert batch.labels[0, 0].item() == IGNORE_INDEX  # nor is <boi>
    assert batch.labels[0, 1].item() == IGNORE_INDEX  # <boi> is followed by a patch
    assert (batch.labels[1:] == IGNORE_INDEX).all()  # all-padding rows carry no loss
    assert batch.doc_ids[2].tolist() == list(range(32))
    with pytest.raises(ValueError, match="source"):
        pack_documents([Document("video", ["x"])], cfg, TOK)


def test_config_validate_names_field():
    with pytest.raises(ValueError, match="image_size"):
        DataConfig(image_size=30, patch_size=8).validate()
    with pytest.raises(ValueError, match="weights"):
        DataConfig(weights=[1.0]).validate()
    with pytest.raises(ValueError, match="seq_len"):
        DataConfig(seq_len=10).validate()
    DataConfig().validate()


@pytest.mark.parametrize("seq_len", [12, 13, 24, 40])
def test_piece_lengths_match_split_items(seq_len):
    from pretrain.data.packing import SpecialIds, document_items, piece_lengths, span_length, split_items
    ids = SpecialIds(bos=2, eos=3, pad=0, boi=4, eoi=5)
    g = np.random.default_rng(seq_len)
    for _ in range(200):
        parts, sizes = [], []
        for _ in range(int(g.integers(0, 6))):
            if g.random() < 0.4:
                parts.append(torch.zeros((4, 0)))
                sizes.append(("image", 4))
            else:
                n = int(g.integers(0, 30))
                parts.append(list(range(10, 10 + n)))
                sizes.append(("text", n))
        want = [span_length(p) for p in split_items(document_items(parts, ids), seq_len)]
        assert piece_lengths(sizes, seq_len) == want


def test_cut_to_fit_keeps_every_token_once_in_order():
    """BestFitPacker with cut-to-fit: rows full except rooms < cut_min_tokens or blocked by
    images; each document's tokens appear exactly once, in order; image spans never cut."""
    from pretrain.data.packing import BestFitPacker, Piece, SpecialIds, chain, document_items, span_length, split_items
    ids = SpecialIds(bos=2, eos=3, pad=0, boi=4, eoi=5)
    g = np.random.default_rng(7)
    T, next_id, docs = 64, 100, []
    packer = BestFitPacker(T, cut_min_tokens=4)
    for d in range(60):
        parts = []
        for _ in range(int(g.integers(1, 5))):
            if g.random() < 0.3:
                parts.append(torch.full((10, 1), float(d)))  # a 12-token span, tagged with its doc
            else:
                k = int(g.integers(1, 80))
                parts.append(list(range(next_id, next_id + k)))
                next_id += k
        items = document_items(parts, ids)
        docs.append(items)
        packer.push(chain([Piece(0, its, span_length(its), ref=(0, d, j)) for j, its in enumerate(split_items(items, T))]))
    rows = []
    while packer.buffer:
        rows.append(packer.pop_row())
    seen = {d: [] for d in range(len(docs))}
    padded = 0
    for row in rows:
        used = sum(p.length for p in row)
        assert used <= T and sum(span_length(p.items) for p in row) == used
        padded += T - used
        for p in row:
            seen[p.ref[1]].extend(p.items)

    def flat(items):  # an image counts once (it cannot be cut), text token by token
        return [("i", float(it[0, 0])) if isinstance(it, torch.Tensor) else ("t", int(x))
                for it in items for x in ([0] if isinstance(it, torch.Tensor) else it.tolist())]
    for d, items in enumerate(docs):
        assert flat(seen[d]) == flat(items), d
    assert padded / (len(rows) * T) < 0.08  # vs ~20% without cuts at this tiny T
