"""Instruction data (issue "Supervised fine-tuning on LLaVA-format data"): the chat template's
loss mask, conversations packed apart, and the LLaVA reader's accounting of bad samples.
    .venv/bin/python -m pytest tests/test_sft_data.py -q
"""
import io
import json
import os
import random

import numpy as np
import pytest
import sentencepiece as spm
import torch
from PIL import Image

from pretrain.data import DataConfig
from pretrain.data.chat_template import conversation_parts, turns_of
from pretrain.data.ingest.driver import IngestConfig, run_ingest
from pretrain.data.ingest.llava import read_llava
from pretrain.data.packing import Document, pack_documents
from pretrain.data.shards import ShardReader, load_manifest
from pretrain.data.tokenizer import Tokenizer

IGNORE = -100


@pytest.fixture(scope="module")
def tok(tiny_demo):
    return Tokenizer(os.path.join(tiny_demo, "tokenizer.model"))


def _jpeg(seed: int, size: int = 48) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def _conversation(rng: random.Random, n_turns: int, image: bool) -> list[dict]:
    words = ["red", "circle", "the", "top left", "what", "is", "shape", "blue", "square"]
    conv = []
    for j in range(n_turns):
        q = " ".join(rng.choice(words) for _ in range(rng.randint(1, 6))) + "?"
        a = " ".join(rng.choice(words) for _ in range(rng.randint(1, 5))) + "."
        conv += [{"from": "human", "value": ("<image>\n" if image and j == 0 else "") + q},
                 {"from": "gpt", "value": a}]
    return conv


def _document(conv, tok, images) -> Document:
    parts = conversation_parts(turns_of(conv), tok)
    return Document("sft", [images[p] if isinstance(p, int) else p for p in parts])


def _expected_targets(row_tokens: np.ndarray, doc_ids: np.ndarray, tok) -> dict[int, int]:
    """Brute force, from the token stream alone: inside each document, every token from just after
    an <|assistant|> marker up to and including the next <|end|> is a target of the position
    before it, and so is the document's closing </s> (it follows the last answer, as LLaVA trains
    its separator). Nothing else is."""
    _, assistant, end = tok.chat_ids()
    want, inside = {}, False
    for p in range(1, len(row_tokens)):
        if doc_ids[p] != doc_ids[p - 1]:
            inside = False
            continue
        if inside:
            want[p - 1] = int(row_tokens[p])
            if row_tokens[p] == end:
                inside = False
        elif row_tokens[p] == assistant:
            inside = True
        elif row_tokens[p] == tok.eos_id and row_tokens[p - 1] == end:
            want[p - 1] = int(row_tokens[p])
    return want


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_mask_covers_exactly_the_assistant_tokens(tok, seed):
    rng = random.Random(seed)
    images = [Image.open(io.BytesIO(_jpeg(seed)))]
    docs = [_document(_conversation(rng, rng.randint(1, 3), image=bool(i % 2)), tok, images) for i in range(5)]
    cfg = DataConfig(seq_len=400, image_size=16, patch_size=8, sources=["sft"], weights=[1.0], pack_buffer=8)
    batch = pack_documents(docs, cfg, tok, sources=["sft"])
    batch.validate()
    assert int(batch.tokens.max()) < tok.vocab_size  # the NO_LOSS flag never reaches the model
    n_targets = 0
    for b in range(batch.tokens.shape[0]):
        want = _expected_targets(batch.tokens[b].numpy(), batch.doc_ids[b].numpy(), tok)
        got = {p: int(v) for p, v in enumerate(batch.labels[b].tolist()) if v != IGNORE}
        assert got == want
        n_targets += len(got)
    assert n_targets > 0
    # the image's <boi>/<eoi> sit in a user turn: never targets
    assert not bool(((batch.labels == tok.boi_id) | (batch.labels == tok.eoi_id)).any())


def test_conversations_are_packed_apart(tok):
    rng = random.Random(7)
    images = [Image.open(io.BytesIO(_jpeg(1)))]
    docs = [_document(_conversation(rng, 1, image=True), tok, images) for _ in range(6)]
    cfg = DataConfig(seq_len=256, image_size=16, patch_size=8, sources=["sft"], weights=[1.0], pack_buffer=8)
    batch = pack_documents(docs, cfg, tok, sources=["sft"])
    bos = tok.bos_id
    packed_rows = 0
    for b in range(batch.tokens.shape[0]):
        toks, docs_b = batch.tokens[b], batch.doc_ids[b]
        starts = (toks == bos).nonzero().flatten().tolist()
        packed_rows += len(starts) > 1
        for s in starts:  # each conversation is its own document, starting at position 0
            assert batch.position_ids[b, s] == 0 and (s == 0 or docs_b[s] != docs_b[s - 1])
        # the attention rule only lets a token see keys of its own document
        same = docs_b[:, None] == docs_b[None, :]
        for s in starts[1:]:
            assert not bool(same[s:, :s][docs_b[s:] == docs_b[s]].any())
    assert packed_rows > 0  # several conversations really share a row


def test_llava_reader_counts_every_bad_sample(tiny_demo, tmp_path):
    root = tmp_path / "imgs"
    (root / "coco").mkdir(parents=True)
    (root / "coco" / "a.jpg").write_bytes(_jpeg(0))
    (root / "coco" / "b.jpg").write_bytes(_jpeg(1))
    (tmp_path / "secret.jpg").write_bytes(_jpeg(2))
    rng = random.Random(0)
    good = [
        {"id": "img", "image": "coco/a.jpg", "conversations": _conversation(rng, 1, True)},
        {"id": "multi", "image": "coco/b.jpg", "conversations": _conversation(rng, 3, True)},
        {"id": "text", "conversations": _conversation(rng, 2, False)},
    ]
    bad = {
        "missing_image_file": {"id": "m", "image": "coco/nope.jpg", "conversations": _conversation(rng, 1, True)},
        "no_assistant_turn": {"id": "n", "conversations": [{"from": "human", "value": "hi"}]},
        "image_placeholder_mismatch": {"id": "p", "image": "coco/a.jpg",
                                       "conversations": [{"from": "human", "value": "<image> and <image>?"},
                                                         {"from": "gpt", "value": "one."}]},
        "too_long": {"id": "l", "conversations": [{"from": "human", "value": "what " * 400},
                                                  {"from": "gpt", "value": "yes."}]},
        "bad_turns": {"id": "r", "conversations": [{"from": "gpt", "value": "first?"},
                                                   {"from": "human", "value": "no."}]},
        "image_path_outside_root": {"id": "o", "image": "../secret.jpg", "conversations": _conversation(rng, 1, True)},
        "bad_json": "not an object",
    }
    data = good[:2] + list(bad.values()) + good[2:]
    (root / "llava.json").write_text(json.dumps(data))
    cfg = IngestConfig(output=str(tmp_path / "out"), tokenizer=os.path.join(tiny_demo, "tokenizer.model"),
                       source="sft", val_fraction=0.0, val_min_docs=0, image_size=32, min_image_size=16, progress=False,
                       max_doc_tokens=300, image_tokens=18)
    stats = run_ingest([str(root / "llava.json")], cfg, read_llava)
    assert stats.samples == len(good) and stats.images == 2
    assert stats.skipped == {reason: 1 for reason in bad}
    assert stats.samples + sum(stats.skipped.values()) == len(data)
    m = load_manifest(cfg.output)
    (shard,) = m.select("sft", "train")
    r = ShardReader(m.abspath(shard))
    tok = Tokenizer(cfg.tokenizer)
    texts = []
    for key in r.keys:
        doc = r.read_json(key)
        ids = [i & ~(1 << 40) for p in doc["parts"] if isinstance(p, list) for i in p]
        texts.append(tok.decode(ids))
    assert any("first?" not in t and good[2]["conversations"][1]["value"] in t for t in texts)


def test_tokenizer_without_chat_markers_is_refused_clearly(tmp_path):
    lines = ["a small corpus of plain words for a tokenizer"] * 50
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "old"),
                                   vocab_size=60, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
                                   control_symbols=["<boi>", "<eoi>"], hard_vocab_limit=False, minloglevel=2)
    tok = Tokenizer(str(tmp_path / "old.model"))
    with pytest.raises(ValueError, match="no chat markers.*retrain"):
        tok.chat_ids()
