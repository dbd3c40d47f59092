"""Tokenizer: special ids, control symbols unreachable from raw text, byte fallback.

    .venv/bin/python -m pytest tests/test_data_tokenizer.py -q
"""
import os
import random

import pytest

from pretrain.data.corpora.demo import COLOURS, SHAPES, prose_sentence
from pretrain.data.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    rng = random.Random(0)
    lines = [f"a {rng.choice(COLOURS)} {rng.choice(SHAPES)} at the top left." for _ in range(300)]
    lines += [prose_sentence(rng) for _ in range(300)]
    prefix = str(tmp_path_factory.mktemp("tok") / "tokenizer")
    return Tokenizer(train_tokenizer(iter(lines), prefix, vocab_size=512))


def test_special_ids(tok):
    ids = {tok.pad_id, tok.bos_id, tok.eos_id, tok.boi_id, tok.eoi_id}
    assert len(ids) == 5 and max(ids) < tok.vocab_size
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.boi_id, tok.eoi_id) == (0, 2, 3, 4, 5)


def test_control_symbols_not_producible_from_text(tok):
    specials = {tok.pad_id, tok.bos_id, tok.eos_id, tok.boi_id, tok.eoi_id}
    for text in ["<boi>", "<eoi>", "<s>", "</s>", "<pad>", "x<boi>y", " <boi> <eoi> </s><s>",
                 "<<boi>>", "a red <boi>circle<eoi>."]:
        ids = tok.encode(text)
        assert not specials & set(ids), (text, ids)
        assert tok.decode(ids) == text  # and it still round-trips


def test_byte_fallback_roundtrip(tok):
    for text in ["Zürich 東京 🙂", "tab\tand\u00a0nbsp", "a purple cross at the center."]:
        assert tok.decode(tok.encode(text)) == text
        assert 1 not in tok.encode(text)  # no <unk>


def test_demo_words_are_single_pieces(tok):
    for w in COLOURS + SHAPES:
        assert len(tok.encode("a " + w)) == 2, (w, [tok.id_to_piece(i) for i in tok.encode("a " + w)])


def test_missing_model_file(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        Tokenizer(str(tmp_path / "nope.model"))


def test_tool_trains_from_jsonl_and_control_symbols_hold(tmp_path):
    """tools/train_tokenizer.py on ingest's text JSONL (gzip), then the control-symbol contract:
    raw text "<boi>" (even if it is frequent in the training text) never yields the <boi> id."""
    import gzip
    import json
    import subprocess
    import sys
    rng = random.Random(1)
    docs = [{"text": f"{prose_sentence(rng)} <boi> <eoi> </s>\n{prose_sentence(rng)}"} for _ in range(300)]
    src = tmp_path / "docs.jsonl.gz"
    src.write_bytes(gzip.compress("\n".join(json.dumps(d) for d in docs).encode() + b"\n{broken\n"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "tools", "train_tokenizer.py"), "--input", str(src),
                          "--output", str(tmp_path / "tok"), "--vocab-size", "400", "--max-lines", "400"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    tok = Tokenizer(str(tmp_path / "tok.model"))
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.boi_id, tok.eoi_id) == (0, 2, 3, 4, 5)
    for text in ["<boi>", "<eoi>", "a <boi> b", "<boi><eoi></s>"]:
        ids = tok.encode(text)
        assert tok.boi_id not in ids and tok.eoi_id not in ids and tok.eos_id not in ids, (text, ids)
        assert tok.decode(ids) == text
