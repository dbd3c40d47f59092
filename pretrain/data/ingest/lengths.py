"""Bounded sample lengths: a long document becomes several documents, cut at paragraph boundaries.

Without a bound one scraped page (or a 1 MB "caption") becomes a single sample of hundreds of
thousands of tokens that the packer must carry for minutes. The driver truncates captions to
`IngestConfig.max_caption_tokens` (a caption is one unit with its image; cutting it into
several pairs would repeat the image) and hands longer text/interleaved documents to
`split_document`, which cuts them into pieces of at most `max_tokens`, counting each image as
`image_tokens` (its place in a packed row). Cuts fall between paragraphs (blank lines) and
between an image and the text around it; a single paragraph longer than the bound is cut every
`max_tokens` tokens. Text and images keep their order; every piece is a document of its own.
"""
from __future__ import annotations

import re
from typing import Union

from pretrain.data.tokenizer import Tokenizer

_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")

Part = Union[list, int]  # token ids of a text, or the index of an image


def paragraphs(text: str) -> list[str]:
    """The non-blank paragraphs of a text (split at blank lines)."""
    return [p for p in _PARAGRAPH_BREAK.split(text) if p.strip()]


def split_document(parts: list[Union[str, int]], tok: Tokenizer, max_tokens: int,
                   image_tokens: int) -> list[list[Part]]:
    """Raw parts (text str / image index) -> pieces (token-id lists / image index), each costing
    at most max_tokens (an image alone may cost more, it cannot be cut)."""
    units: list[tuple[int, Part]] = []
    for p in parts:
        if isinstance(p, int):
            units.append((image_tokens, p))
            continue
        for para in paragraphs(p):
            ids = tok.encode(para)
            for i in range(0, len(ids), max_tokens):
                units.append((len(ids[i:i + max_tokens]), ids[i:i + max_tokens]))
    pieces: list[list[Part]] = []
    cur: list[Part] = []
    cost = 0
    for c, u in units:
        if cur and cost + c > max_tokens:
            pieces.append(cur)
            cur, cost = [], 0
        if isinstance(u, list) and cur and isinstance(cur[-1], list):
            cur[-1] = cur[-1] + u  # paragraphs of one run of text stay one text part
        else:
            cur.append(u)
        cost += c
    if cur:
        pieces.append(cur)
    return pieces
