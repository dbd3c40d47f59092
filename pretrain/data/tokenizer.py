"""SentencePiece tokenizer: training and a small wrapper with the special ids.

Special pieces, all CONTROL symbols (sentencepiece never produces them from raw text, so a
document containing the string "<boi>" cannot forge an image marker):
    <pad> = 0, <unk> = 1, <s> (BOS) = 2, </s> (EOS) = 3, <boi> = 4, <eoi> = 5,
    <|user|> = 6, <|assistant|> = 7, <|end|> = 8 (the chat template's role markers, pretrain/data/chat_template.py).
The chat markers are reserved when the tokenizer is trained, so every pretrained model already has
their embeddings and instruction tuning needs no vocabulary surgery. A tokenizer trained before
they existed still works for pretraining; `chat_ids` names what is missing when SFT asks for them.
Byte fallback is on, so any UTF-8 text round-trips without <unk>.

Train from the command line with `python tools/train_tokenizer.py --input a.txt --output PREFIX`;
inputs may be plain text (one sentence per line) or the text JSONL that ingest reads
(`{"text": ...}` per line, plain/.gz/.zst); `sample_training_text` draws a fixed-size uniform
sample of lines from them (reservoir sampling, seeded) so that a web-scale corpus trains in minutes.
"""
from __future__ import annotations

import os
import random
from typing import Iterable, Iterator, Union

import sentencepiece as spm

BOI, EOI = "<boi>", "<eoi>"
USER, ASSISTANT, END = "<|user|>", "<|assistant|>", "<|end|>"  # chat role markers (SFT)


def train_tokenizer(text_files_or_iter: Union[str, list[str], Iterable[str]], prefix: str,
                    vocab_size: int = 512, model_type: str = "bpe", *,
                    max_sentence_length: int = 16384, num_threads: int = 2) -> str:
    """Train a sentencepiece model; returns the path of PREFIX.model.

    `text_files_or_iter` is a path, a list of paths (one sentence per line), or an iterable of
    strings. vocab_size is a soft limit, so a small corpus never fails for lack of pieces.
    """
    kwargs = dict(
        model_prefix=prefix, vocab_size=vocab_size, model_type=model_type,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        control_symbols=[BOI, EOI, USER, ASSISTANT, END], byte_fallback=True, hard_vocab_limit=False,
        character_coverage=1.0, max_sentence_length=max_sentence_length,
        num_threads=num_threads, minloglevel=2,
        # Digits split one by one, as in most LLM tokenizers; keeps numbers compositional.
        split_digits=True,
        # No NFKC, whitespace kept as written (tabs, runs of spaces): text round-trips exactly.
        remove_extra_whitespaces=False, normalization_rule_name="identity",
    )
    if os.path.dirname(prefix):
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
    if isinstance(text_files_or_iter, str):
        text_files_or_iter = [text_files_or_iter]
    if isinstance(text_files_or_iter, (list, tuple)) and all(isinstance(p, str) and os.path.isfile(p)
                                                              for p in text_files_or_iter):
        spm.SentencePieceTrainer.train(input=",".join(text_files_or_iter), **kwargs)
    else:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(text_files_or_iter), **kwargs)
    return prefix + ".model"


class Tokenizer:
    """Thin wrapper: `.encode(str) -> list[int]` (no BOS/EOS added), `.decode(ids)`, special ids."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise ValueError(f"Tokenizer: model file not found: {path}")
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=path)
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id()
        self.boi_id = self.sp.piece_to_id(BOI)
        self.eoi_id = self.sp.piece_to_id(EOI)
        if min(self.bos_id, self.eos_id, self.pad_id) < 0 or self.boi_id == self.sp.unk_id() \
                or self.eoi_id == self.sp.unk_id():
            raise ValueError(f"Tokenizer {path}: missing one of <s> </s> <pad> <boi> <eoi>")
        self.vocab_size = self.sp.get_piece_size()

    def chat_ids(self) -> tuple[int, int, int]:
        """(<|user|>, <|assistant|>, <|end|>) ids; ValueError if this tokenizer predates them."""
        ids = tuple(self.sp.piece_to_id(p) for p in (USER, ASSISTANT, END))
        if any(i == self.sp.unk_id() for i in ids):
            raise ValueError(f"Tokenizer {self.path}: no chat markers {USER} {ASSISTANT} {END} "
                             f"(trained before they were reserved); retrain it with "
                             f"tools/train_tokenizer.py, which reserves them")
        return ids

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text, out_type=int)

    def decode(self, ids) -> str:
        # Drop ids outside the vocabulary (e.g. arbitrary ids at patch positions).
        return self.sp.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])


def _lines_of(path: str, text_field: str) -> Iterator[str]:
    """Lines of a text file, or of the `text_field` of every JSONL record (plain/.gz/.zst)."""
    from pretrain.data.ingest.io import iter_jsonl
    name = path[:-3] if path.endswith(".gz") else path[:-4] if path.endswith(".zst") else path
    if name.endswith((".jsonl", ".json")):
        for rec in iter_jsonl(path):
            if isinstance(rec, tuple) and isinstance(rec[1].get(text_field), str):
                yield from rec[1][text_field].splitlines()
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            yield line.rstrip("\n")


def sample_training_text(paths: list[str], max_lines: int = 2_000_000, text_field: str = "text",
                         seed: int = 0, max_chars: int = 8192) -> list[str]:
    """A uniform sample of at most max_lines non-empty lines over all inputs (reservoir sampling).

    Lines are truncated to max_chars (sentencepiece drops sentences over max_sentence_length).
    """
    rng = random.Random(seed)
    sample: list[str] = []
    seen = 0
    for path in paths:
        for line in _lines_of(path, text_field):
            if not line.strip():
                continue
            line = line[:max_chars]
            seen += 1
            if len(sample) < max_lines:
                sample.append(line)
            else:
                j = rng.randrange(seen)
                if j < max_lines:
                    sample[j] = line
    if not sample:
        raise ValueError(f"sample_training_text: no text found in {paths[:3]} (field {text_field!r})")
    return sample
