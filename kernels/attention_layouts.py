"""Row layouts (`doc_ids`, `image_ids`) for testing and benchmarking packed attention.

A layout is the pair of int32 `[B, T]` tensors of the `PackedBatch` contract that decide the
attention mask (docs/architecture.md, "The attention mask"). Two families live here so tests and
`tools/bench_attention.py` share them:

- `random_layout`: adversarial small layouts for correctness tests (images at the start and
  end of rows and documents, one-token documents, trailing padding as one-token documents).
- `source_layout`: layouts shaped like the three training sources at benchmark scale
  ("caption": rows of caption documents with one 256-patch image each; "interleaved": long
  documents alternating text and images; "text": text-only documents).

Nothing here touches a kernel; it is plain Python/torch so it runs anywhere.
"""
from __future__ import annotations

import random

import torch

# A row is built as a list of segments (doc, image, length): consecutive tokens of one document,
# all text (image = -1) or all patches of one image.


def _row_from_segments(segments: list[tuple[int, int, int]], T: int) -> tuple[list[int], list[int]]:
    doc_T, img_T = [], []
    for doc, img, n in segments:
        doc_T += [doc] * n
        img_T += [img] * n
    assert len(doc_T) == T, (len(doc_T), T)
    return doc_T, img_T


def _pad_row(segments: list[tuple[int, int, int]], used: int, T: int, next_doc: int) -> None:
    # Padding: each padding token forms its own document (PackedBatch contract).
    for _ in range(T - used):
        segments.append((next_doc, -1, 1))
        next_doc += 1


def random_row(T: int, rng: random.Random, max_doc: int | None = None, max_img: int | None = None,
               p_image: float = 0.4, p_pad: float = 0.3) -> tuple[list[int], list[int]]:
    """One random row of exactly `T` tokens.

    Documents are random mixes of text runs and image spans; images may open or close a document
    (and hence the row); some documents are a single token; the row may end in padding.
    """
    max_doc = max_doc or max(1, T // 2)
    max_img = max_img or max(1, T // 4)
    segments: list[tuple[int, int, int]] = []
    used, doc, img = 0, 0, 0
    pad = rng.randint(1, max(1, T // 5)) if rng.random() < p_pad else 0
    budget = T - pad
    while used < budget:
        room = budget - used
        kind = rng.random()
        if kind < 0.15:
            doc_len = 1  # one-token document
        elif kind > 0.75:
            doc_len = rng.randint((room + 1) // 2, room)  # a long one, so kernels see unmasked tiles
        else:
            doc_len = rng.randint(1, min(room, max_doc))
        doc_len = min(doc_len, room)
        left = doc_len
        while left > 0:
            if rng.random() < p_image:
                n = rng.randint(1, min(left, max_img))
                segments.append((doc, img, n))
                img += 1
            else:
                n = rng.randint(1, left)
                segments.append((doc, -1, n))
            left -= n
        used += doc_len
        doc += 1
    _pad_row(segments, used, T, doc)
    return _row_from_segments(segments, T)


def random_layout(B: int, T: int, seed: int = 0, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """`B` random rows (see `random_row`); returns int32 `doc_ids_BT`, `image_ids_BT`."""
    rng = random.Random(seed)
    rows = [random_row(T, rng, **kw) for _ in range(B)]
    doc_BT = torch.tensor([r[0] for r in rows], dtype=torch.int32)
    img_BT = torch.tensor([r[1] for r in rows], dtype=torch.int32)
    return doc_BT, img_BT


def edge_layouts(T: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Hand-made one-row layouts for the corner cases named in issue 5."""
    out = []

    def add(name, segments):
        # Clip to T (small T in tests): drop empty segments, cut the last one that overflows.
        clipped, used = [], 0
        for d, i, n in segments:
            n = min(n, T - used)
            if n > 0:
                clipped.append((d, i, n))
                used += n
        segments = clipped
        next_doc = max((d for d, _, _ in segments), default=-1) + 1
        segments = list(segments)
        _pad_row(segments, used, T, next_doc)
        d, i = _row_from_segments(segments, T)
        out.append((name, torch.tensor([d], dtype=torch.int32), torch.tensor([i], dtype=torch.int32)))

    add("one_text_doc", [(0, -1, T)])
    add("one_image_row", [(0, 0, T)])
    add("all_one_token_docs", [])  # every token its own document (all padding)
    a = T // 3
    add("image_at_start_and_end", [(0, 0, a), (0, -1, T - 2 * a), (0, 1, a)])
    add("docs_opened_and_closed_by_images", [(0, 0, a), (0, -1, 1), (1, -1, 1), (1, 1, T - a - 2)])
    add("text_then_padding", [(0, -1, T // 2)])
    return out


# --- benchmark-scale layouts shaped like the three data sources ------------------------------

N_PATCHES = 256  # 224 px images, 14 px patches (the paper's setting)


def source_row(source: str, T: int, rng: random.Random, n_patches: int = N_PATCHES) -> tuple[list[int], list[int]]:
    """One row shaped like a data source.

    caption:     caption documents `<boi> 256 patches <eoi> caption`, ~3 images per 1k tokens.
    interleaved: long documents alternating paragraphs and images, ~1-2 images per 1k tokens.
    text:        text documents of heavy-tailed length (mean ~ T/3), no images.
    Rows are filled to `T` (the last document cut), with no padding, as the best-fit packer does.
    """
    segments: list[tuple[int, int, int]] = []
    used, doc, img = 0, 0, 0

    def push(d, i, n):
        nonlocal used
        n = min(n, T - used)
        if n > 0:
            segments.append((d, i, n))
            used += n

    while used < T:
        if source == "caption":
            push(doc, -1, 1)  # <boi>
            push(doc, img, n_patches)
            img += 1
            push(doc, -1, 1 + rng.randint(8, 60))  # <eoi> + caption
        elif source == "interleaved":
            for _ in range(rng.randint(2, 6)):
                push(doc, -1, rng.randint(100, 800))
                if rng.random() < 0.6:
                    push(doc, -1, 1)
                    push(doc, img, n_patches)
                    img += 1
                    push(doc, -1, 1)
        elif source == "text":
            push(doc, -1, max(16, int(rng.paretovariate(1.5) * T / 6)))
        else:
            raise ValueError(f"unknown source {source!r}; expected caption | interleaved | text")
        doc += 1
    return _row_from_segments(segments, T)


def source_layout(source: str, B: int, T: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`B` rows of one source (see `source_row`); int32 `doc_ids_BT`, `image_ids_BT`."""
    rng = random.Random(seed)
    rows = [source_row(source, T, rng) for _ in range(B)]
    return (torch.tensor([r[0] for r in rows], dtype=torch.int32),
            torch.tensor([r[1] for r in rows], dtype=torch.int32))
