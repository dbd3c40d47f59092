"""Best-fit packing of documents into rows, and building a `PackedBatch` from packed rows.

A document becomes the sequence  BOS, parts..., EOS  where a text part is its token ids and an
image part expands to  <boi>, n_patches patch positions, <eoi>  (an image span is atomic).
A document longer than a row is cut into pieces of at most seq_len, never inside an image span;
each piece is packed as its own document (positions restart at 0, no attention across pieces),
which is the usual choice of packed pretraining.

Rows are filled by `BestFitPacker`: the oldest buffered piece opens a row (so nothing starves),
then the largest buffered piece that still fits is added until none fits; the rest is padding.
Only the first piece of a split document is buffered; its successor is buffered once it has been
placed (after the row closes), so pieces of one document appear in order, in different rows.
Every padding token is its own document (DESIGN.md), so no query ever has zero allowed keys.

`pack_documents` is the entry point for evaluation code that builds batches from given
documents (e.g. probe captions); the training loader uses the same pieces.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from pretrain.batch import IGNORE_INDEX, PackedBatch
from pretrain.data.config import DataConfig
from pretrain.data.images import process_image


@dataclass
class SpecialIds:
    bos: int
    eos: int
    pad: int
    boi: int
    eoi: int

    @classmethod
    def of(cls, tok) -> "SpecialIds":
        return cls(bos=tok.bos_id, eos=tok.eos_id, pad=tok.pad_id, boi=tok.boi_id, eoi=tok.eoi_id)


@dataclass
class Document:
    """A document as given by a caller: a source name and parts.

    A part is a list of token ids (text, without BOS/EOS), a str (encoded with the tokenizer by
    pack_documents), or an image: PIL image, encoded bytes, or a uint8 tensor/array [3,H,W] /
    [H,W,3]. The training loader passes images already as patches (float [n_patches, 3*p*p]).
    """
    source: str
    parts: list
    key: str = ""


@dataclass
class Piece:
    """A document (or one piece of a split one), ready to place in a row.

    items: int token ids (BOS/EOS included) and float patch tensors [n_patches, D]; a tensor
    stands for the whole span <boi> patches <eoi>.
    """
    source_idx: int
    items: list
    length: int
    ref: tuple = ()  # where it came from (for resume and debugging)
    rest: list = field(default_factory=list)  # the document's later pieces, queued behind this one


def chain(pieces: list[Piece]) -> Piece:
    """Link a split document's pieces: only the first enters the buffer; each later piece is
    pushed when its predecessor is placed, so a document's pieces are laid out in order."""
    pieces[0].rest = pieces[1:]
    return pieces[0]


def span_length(items: list) -> int:
    return sum(1 if isinstance(it, int) else it.shape[0] + 2 for it in items)


def document_items(parts: list, ids: SpecialIds) -> list:
    """Parts (token lists and patch tensors) -> items of the whole document with BOS/EOS."""
    items: list = [ids.bos]
    for part in parts:
        if isinstance(part, torch.Tensor) and part.is_floating_point():
            items.append(part)
        else:
            items.extend(int(t) for t in part)
    items.append(ids.eos)
    return items


def split_items(items: list, seq_len: int) -> list[list]:
    """Cut items into consecutive pieces of length <= seq_len, never inside an image span."""
    pieces: list[list] = [[]]
    room = seq_len
    for it in items:
        n = 1 if isinstance(it, int) else it.shape[0] + 2
        if n > seq_len:
            raise ValueError(f"split_items: an image span of {n} tokens exceeds seq_len {seq_len}")
        if n > room:
            pieces.append([])
            room = seq_len
        pieces[-1].append(it)
        room -= n
    return [p for p in pieces if p]


def piece_lengths(part_sizes: list[tuple[str, int]], seq_len: int) -> list[int]:
    """Lengths of the pieces split_items would cut, from sizes only (no tokens, no pixels).

    part_sizes: ("text", n_tokens) or ("image", n_patches) per part; BOS/EOS are added here.
    Used to plan packing cheaply (e.g. agreeing on evaluation batch counts across ranks).
    """
    lengths: list[int] = []
    cur = 0

    def add_text(n: int) -> None:
        nonlocal cur
        while n > 0:
            if cur == seq_len:
                lengths.append(cur)
                cur = 0
            take = min(n, seq_len - cur)
            cur += take
            n -= take

    add_text(1)  # BOS
    for kind, n in part_sizes:
        if kind == "text":
            add_text(n)
            continue
        if n + 2 > seq_len:
            raise ValueError(f"piece_lengths: an image span of {n + 2} tokens exceeds seq_len {seq_len}")
        if cur + n + 2 > seq_len:
            lengths.append(cur)
            cur = 0
        cur += n + 2
    add_text(1)  # EOS
    lengths.append(cur)
    return [n for n in lengths if n > 0]


class BestFitPacker:
    """Bounded-buffer best-fit packing over items with lengths (pure bookkeeping, no tensors)."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self.buffer: list[Piece] = []

    def push(self, piece: Piece) -> None:
        if piece.length > self.seq_len:
            raise ValueError(f"BestFitPacker.push: piece of {piece.length} tokens > seq_len {self.seq_len}")
        self.buffer.append(piece)

    def pop_row(self) -> list[Piece]:
        """Oldest piece first, then repeatedly the largest piece that fits (ties: oldest)."""
        if not self.buffer:
            raise ValueError("BestFitPacker.pop_row: empty buffer")
        row = [self.buffer.pop(0)]
        room = self.seq_len - row[0].length
        while room > 0:
            best = -1
            for j, p in enumerate(self.buffer):
                if p.length <= room and (best < 0 or p.length > self.buffer[best].length):
                    best = j
            if best < 0:
                break
            p = self.buffer.pop(best)
            row.append(p)
            room -= p.length
        for p in row:  # successors enter only now, so never in the same row as their predecessor
            if p.rest:
                self.push(chain(p.rest))
        return row


def build_batch(rows: list[list[Piece]], row_sources: list[int], seq_len: int, ids: SpecialIds,
                patch_dim: int) -> PackedBatch:
    """Lay packed rows out as a PackedBatch (all fields as DESIGN.md defines them)."""
    B, T = len(rows), seq_len
    tokens_BT = torch.full((B, T), ids.pad, dtype=torch.int64)
    is_patch_BT = torch.zeros((B, T), dtype=torch.bool)
    doc_ids_BT = torch.zeros((B, T), dtype=torch.int32)
    image_ids_BT = torch.full((B, T), -1, dtype=torch.int32)
    position_ids_BT = torch.zeros((B, T), dtype=torch.int32)
    source_ids_BT = torch.zeros((B, T), dtype=torch.int8)
    patches: list[torch.Tensor] = []
    for b, row in enumerate(rows):
        t = 0
        n_img = 0
        for d, piece in enumerate(row):
            start = t
            for it in piece.items:
                if isinstance(it, int):
                    tokens_BT[b, t] = it
                    t += 1
                    continue
                n = it.shape[0]
                tokens_BT[b, t] = ids.boi
                is_patch_BT[b, t + 1:t + 1 + n] = True
                image_ids_BT[b, t + 1:t + 1 + n] = n_img
                tokens_BT[b, t + n + 1] = ids.eoi
                patches.append(it)
                n_img += 1
                t += n + 2
            if t > T:
                raise ValueError(f"build_batch: row {b} overflows seq_len {T}")
            doc_ids_BT[b, start:t] = d
            position_ids_BT[b, start:t] = torch.arange(t - start, dtype=torch.int32)
            source_ids_BT[b, start:t] = piece.source_idx
        # Padding: each token its own document, position 0, source of the row.
        n_docs = len(row)
        doc_ids_BT[b, t:] = torch.arange(n_docs, n_docs + T - t, dtype=torch.int32)
        source_ids_BT[b, t:] = row_sources[b]
    # labels[i] = tokens[i+1] iff token i+1 is a text token of the same document.
    labels_BT = torch.full((B, T), IGNORE_INDEX, dtype=torch.int64)
    keep_BT = (doc_ids_BT[:, 1:] == doc_ids_BT[:, :-1]) & ~is_patch_BT[:, 1:]
    labels_BT[:, :-1] = torch.where(keep_BT, tokens_BT[:, 1:], torch.full_like(tokens_BT[:, 1:], IGNORE_INDEX))
    patches_PD = torch.cat(patches, 0) if patches else torch.zeros((0, patch_dim), dtype=torch.float32)
    return PackedBatch(tokens=tokens_BT, patches=patches_PD, is_patch=is_patch_BT, doc_ids=doc_ids_BT,
                       image_ids=image_ids_BT, position_ids=position_ids_BT, labels=labels_BT,
                       source_ids=source_ids_BT)


def pack_documents(docs: list[Document], cfg: DataConfig, tokenizer, *, best_fit: bool = True,
                   min_rows: int = 0, augment: bool = False, seed: int = 0,
                   sources: Optional[list[str]] = None) -> PackedBatch:
    """Build one PackedBatch from given documents (images: eval resize unless augment=True).

    best_fit=True packs with a buffer of cfg.pack_buffer pieces; best_fit=False puts every
    document (piece) in its own row, in order, which is what probes usually want (row i =
    document i when documents fit in a row). min_rows pads the batch with all-padding rows.
    """
    sources = list(sources or cfg.sources)
    ids = SpecialIds.of(tokenizer)
    pieces: list[Piece] = []
    for i, doc in enumerate(docs):
        if doc.source not in sources:
            raise ValueError(f"pack_documents: document {i} has source {doc.source!r} not in {sources}")
        parts = []
        for k, part in enumerate(doc.parts):
            if isinstance(part, str):
                parts.append(tokenizer.encode(part))
            elif isinstance(part, list):
                parts.append(part)
            elif isinstance(part, torch.Tensor) and part.is_floating_point():
                parts.append(part)  # already patches
            else:
                rng = np.random.default_rng([seed, i, k])
                parts.append(process_image(part, cfg.image_size, cfg.patch_size, augment=augment,
                                           scale=(cfg.crop_scale_min, cfg.crop_scale_max),
                                           hflip_prob=cfg.hflip_prob, rng=rng))
        src = sources.index(doc.source)
        pieces.append(chain([Piece(src, items, span_length(items), ref=(doc.key or i, j))
                             for j, items in enumerate(split_items(document_items(parts, ids), cfg.seq_len))]))
    rows: list[list[Piece]] = []
    if best_fit:
        packer = BestFitPacker(cfg.seq_len)
        queue = list(pieces)
        while queue or packer.buffer:
            while queue and len(packer.buffer) < cfg.pack_buffer:
                packer.push(queue.pop(0))
            rows.append(packer.pop_row())
    else:
        rows = [[q] for p in pieces for q in [p] + p.rest]
    while len(rows) < min_rows:
        rows.append([])  # an empty row is all padding
    row_sources = [r[0].source_idx if r else 0 for r in rows]
    return build_batch(rows, row_sources, cfg.seq_len, ids, cfg.patch_dim)
