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
Every padding token is its own document (docs/architecture.md), so no query ever has zero allowed keys.

`pack_documents` is the entry point for evaluation code that builds batches from given
documents (e.g. probe captions); the training loader uses the same pieces.

Items are kept in runs, not tokens: a text run is a 1-D int64 numpy array (a bare int is also
accepted), an image is a float patch tensor [n_patches, D] standing for <boi> patches <eoi>.
Every step below costs O(runs), not O(tokens), in Python; `build_batch` writes whole runs into
numpy arrays. This is what lets one core pack well over 100k tokens per second.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from pretrain.batch import IGNORE_INDEX, PackedBatch
from pretrain.data.config import DataConfig
from pretrain.data.images import process_image


# A text id with this bit set is context only: it is laid out as `id & ~NO_LOSS` and is never a
# target (labels -100 where it is the next token). Instruction tuning (pretrain/data/chat_template.py)
# marks the user's turns this way so the loss covers the assistant's tokens only; it rides through
# packing, cutting and stored rows untouched because it is part of the id. An image span takes the
# flag of the text token just before it (an image in a user turn is context).
NO_LOSS = 1 << 40


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

    items: text runs (int64 numpy arrays or ints; BOS/EOS included) and float patch tensors
    [n_patches, D]; a tensor stands for the whole span <boi> patches <eoi>.
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


def _is_image(it) -> bool:
    return isinstance(it, torch.Tensor) and it.is_floating_point()


def item_length(it) -> int:
    if isinstance(it, (int, np.integer)):
        return 1
    return it.shape[0] + 2 if _is_image(it) else len(it)


def span_length(items: list) -> int:
    return sum(item_length(it) for it in items)


def document_items(parts: list, ids: SpecialIds) -> list:
    """Parts (token lists/arrays and patch tensors) -> items of the whole document with BOS/EOS.

    Adjacent text is merged into one int64 run, so a text-only document is a single array.
    """
    items: list = []
    text: list = [np.array([ids.bos], dtype=np.int64)]
    for part in parts:
        if _is_image(part):
            if text:
                items.append(np.concatenate(text) if len(text) > 1 else text[0])
            items.append(part)
            text = []
        elif len(part):
            text.append(np.asarray(part, dtype=np.int64))
    text.append(np.array([ids.eos], dtype=np.int64))
    items.append(np.concatenate(text))
    return [it for it in items if _is_image(it) or len(it)]


def split_items(items: list, seq_len: int) -> list[list]:
    """Cut items into consecutive pieces of length <= seq_len, never inside an image span."""
    pieces: list[list] = [[]]
    room = seq_len
    for it in items:
        if _is_image(it):
            n = it.shape[0] + 2
            if n > seq_len:
                raise ValueError(f"split_items: an image span of {n} tokens exceeds seq_len {seq_len}")
            if n > room:
                pieces.append([])
                room = seq_len
            pieces[-1].append(it)
            room -= n
            continue
        arr = np.array([it], dtype=np.int64) if isinstance(it, (int, np.integer)) else it
        while len(arr):
            if room == 0:
                pieces.append([])
                room = seq_len
            take = arr[:room]
            pieces[-1].append(take)
            room -= len(take)
            arr = arr[len(take):]
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


def cut_items(items: list, offset: int, room: int, skip_blocking_image: bool = False) -> tuple[list, int, int]:
    """Items covering tokens [offset, offset + <=room) of `items`, never cutting an image span.

    Returns (items, tokens taken, tokens skipped). Text runs are cut anywhere. An image span
    that does not fit ends the cut; if it would be the first item, it is skipped
    (skip_blocking_image=True: the tail filler, which must not stall on an image) or the cut is
    empty (False).
    """
    out, used, skipped, t = [], 0, 0, 0
    for it in items:
        n = item_length(it)
        if t + n <= offset:
            t += n
            continue
        if _is_image(it):
            if used + n > room:
                if not out and skip_blocking_image:
                    skipped += n
                    t += n
                    continue
                break
            out.append(it)
            used += n
        else:
            arr = np.array([it], dtype=np.int64) if isinstance(it, (int, np.integer)) else it
            a = max(offset - t, 0)
            take = arr[a:a + room - used]
            if len(take):
                out.append(take)
                used += len(take)
        t += n
        if used >= room:
            break
    return out, used, skipped


def cut_piece(piece: Piece, n: int) -> tuple[Piece, Piece]:
    """Split a piece after its first n tokens (n must end outside an image span).

    refs: (epoch, index, j[, offset]) -> head keeps the piece's offset, the tail's offset grows
    by n; the tail keeps the chain of later pieces. Resume rebuilds a tail from its ref by
    `drop_prefix` on piece j.
    """
    head_items, used, _ = cut_items(piece.items, 0, n)
    if used != n:
        raise ValueError(f"cut_piece: cannot cut {n} tokens off a piece (image span in the way)")
    tail_items, rest_len, _ = cut_items(piece.items, n, piece.length - n)
    off = piece.ref[3] if len(piece.ref) > 3 else 0
    head = Piece(piece.source_idx, head_items, n, ref=tuple(piece.ref[:3]) + (off,))
    tail = Piece(piece.source_idx, tail_items, rest_len, ref=tuple(piece.ref[:3]) + (off + n,), rest=piece.rest)
    return head, tail


def drop_prefix(piece: Piece, n: int) -> Piece:
    """The piece without its first n tokens (what remains of it after a cut), ref offset n."""
    return piece if n == 0 else cut_piece(piece, n)[1]


class BestFitPacker:
    """Bounded-buffer best-fit packing over items with lengths (pure bookkeeping, no tensors).

    cut_min_tokens > 0 turns on cut-to-fit: when no buffered piece fits the room left in a
    row and that room is at least cut_min_tokens, the piece that can give the longest head
    (cut outside image spans, at least cut_min_tokens; ties: the oldest) gives it to the row and
    its tail stays in the buffer, in place; repeated while room is left. Long interleaved documents (image spans of 258 tokens at
    T = 1024) leave rooms that whole pieces rarely fill; cutting brings their padding from ~5%
    to ~0 at the price of a few more document boundaries.
    """

    def __init__(self, seq_len: int, cut_min_tokens: int = 0):
        self.seq_len = seq_len
        self.cut_min_tokens = cut_min_tokens
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
        while self.cut_min_tokens and room >= self.cut_min_tokens and self.buffer:
            # The piece giving the longest head (ties: oldest); an image span may stop a head
            # short, hence the loop.
            n, j = max((cut_items(p.items, 0, room)[1], -j) for j, p in enumerate(self.buffer))
            j = -j
            if n < self.cut_min_tokens:
                break
            head, self.buffer[j] = cut_piece(self.buffer[j], n)
            row.append(head)
            room -= n
        for p in row:  # successors enter only now, so never in the same row as their predecessor
            if p.rest:
                self.push(chain(p.rest))
        return row


MARKER_TARGETS = ("none", "boi", "both")


def build_batch(rows: list[list[Piece]], row_sources: list[int], seq_len: int, ids: SpecialIds,
                patch_dim: int, marker_targets: str = "none") -> PackedBatch:
    """Lay packed rows out as a PackedBatch (all fields as the batch contract defines them).

    `marker_targets` (`data.image_marker_targets`) says which image markers are targets:
    - "none" (default): no target is a marker. Images are inputs only, as in Fuyu / LLaVA-style
      training where the loss covers text alone; the caption loss is the loss of the caption
      given its image, comparable with the paper's "cross-entropy on image-caption data" read
      as a text loss (the paper does not say how it treats markers).
    - "boi": the token before an image also predicts `<boi>` (where an image starts is a real
      prediction in interleaved documents; in caption documents it always follows BOS).
    - "both": also `<eoi>` at the last patch. The fixed patch count determines it completely:
      a free target (2 of 15 targets of a 12-token caption were markers), which lowers the
      reported caption loss. Chameleon-style models, which generate images, do train on their
      markers (and on the image tokens themselves); a model that emits text only has no use for
      them."""
    if marker_targets not in MARKER_TARGETS:
        raise ValueError(f"build_batch: marker_targets={marker_targets!r}, expected one of {MARKER_TARGETS}")
    B, T = len(rows), seq_len
    tokens_BT = np.full((B, T), ids.pad, dtype=np.int64)
    is_patch_BT = np.zeros((B, T), dtype=np.bool_)
    doc_ids_BT = np.zeros((B, T), dtype=np.int32)
    image_ids_BT = np.full((B, T), -1, dtype=np.int32)
    position_ids_BT = np.zeros((B, T), dtype=np.int32)
    source_ids_BT = np.zeros((B, T), dtype=np.int8)
    arange_T = np.arange(T, dtype=np.int32)
    patches: list[torch.Tensor] = []
    for b, row in enumerate(rows):
        used = sum(p.length for p in row)
        if used > T:
            raise ValueError(f"build_batch: row {b} overflows seq_len {T} ({used} tokens)")
        t = 0
        n_img = 0
        for d, piece in enumerate(row):
            start = t
            for it in piece.items:
                if _is_image(it):
                    n = it.shape[0]
                    # An image inside context-only text (a user turn) is context too: its markers
                    # take the NO_LOSS flag of the token before them.
                    flag = NO_LOSS if t > start and tokens_BT[b, t - 1] & NO_LOSS else 0
                    tokens_BT[b, t] = ids.boi | flag
                    is_patch_BT[b, t + 1:t + 1 + n] = True
                    image_ids_BT[b, t + 1:t + 1 + n] = n_img
                    tokens_BT[b, t + n + 1] = ids.eoi | flag
                    patches.append(it)
                    n_img += 1
                    t += n + 2
                elif isinstance(it, (int, np.integer)):
                    tokens_BT[b, t] = it
                    t += 1
                else:
                    n = len(it)
                    tokens_BT[b, t:t + n] = it
                    t += n
            doc_ids_BT[b, start:t] = d
            position_ids_BT[b, start:t] = arange_T[:t - start]
            source_ids_BT[b, start:t] = piece.source_idx
        # Padding: each token its own document, position 0, source of the row.
        n_docs = len(row)
        doc_ids_BT[b, t:] = arange_T[:T - t] + n_docs
        source_ids_BT[b, t:] = row_sources[b]
    context_BT = (tokens_BT & NO_LOSS) != 0
    tokens_BT &= ~NO_LOSS
    # labels[i] = tokens[i+1] iff token i+1 is a text token of the same document (and neither
    # context-only, NO_LOSS, nor a marker that `marker_targets` excludes).
    labels_BT = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
    keep_BT = (doc_ids_BT[:, 1:] == doc_ids_BT[:, :-1]) & ~is_patch_BT[:, 1:] & ~context_BT[:, 1:]
    if marker_targets != "both":
        keep_BT &= tokens_BT[:, 1:] != ids.eoi
    if marker_targets == "none":
        keep_BT &= tokens_BT[:, 1:] != ids.boi
    labels_BT[:, :-1] = np.where(keep_BT, tokens_BT[:, 1:], IGNORE_INDEX)
    # numpy, not torch.cat: no intra-op thread pool for a copy (see images.patchify).
    patches_PD = torch.from_numpy(np.concatenate([p.numpy() for p in patches], 0)) if patches \
        else torch.zeros((0, patch_dim), dtype=torch.float32)
    t_ = torch.from_numpy
    return PackedBatch(tokens=t_(tokens_BT), patches=patches_PD, is_patch=t_(is_patch_BT), doc_ids=t_(doc_ids_BT),
                       image_ids=t_(image_ids_BT), position_ids=t_(position_ids_BT), labels=t_(labels_BT),
                       source_ids=t_(source_ids_BT))


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
    return build_batch(rows, row_sources, cfg.seq_len, ids, cfg.patch_dim, cfg.image_marker_targets)
