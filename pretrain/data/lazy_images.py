"""Deferred image decoding: packing sees an image's length, the pixels are made only for rows
that are really built.

The training loader plans rows from lengths (best fit needs nothing else) and decodes, augments
and patchifies the images of a batch only when it builds that batch. This is what lets N worker
processes share one deterministic plan: every worker plans every batch (cheap: JSON and
token ids), and worker w decodes only batches w, w + N, ... (`pretrain/data/workers.py`).

An image waiting to be decoded is a placeholder tensor `[n_patches, 0]` (packing's length
functions read `shape[0]`) that carries its encoded bytes and augmentation seed as an attribute.
The seed is the one the eager path used, `[seed, stream, epoch, index, part]`, so a batch's
pixels do not depend on when, where or in which thread they are decoded.

Run the tests: `python -m pytest -q tests/test_data_workers.py`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np
import torch

from pretrain.data.config import DataConfig
from pretrain.data.images import process_image
from pretrain.data.packing import Piece

_ATTR = "lazy_image_source"  # (encoded bytes, augmentation seed or None)


def lazy_image(raw: bytes, n_patches: int, rng_key: Optional[list[int]]) -> torch.Tensor:
    """A placeholder for an image of n_patches patches, decoded later by `materialise_rows`."""
    ph = torch.empty((n_patches, 0))
    setattr(ph, _ATTR, (raw, rng_key))
    return ph


def is_lazy(item) -> bool:
    return isinstance(item, torch.Tensor) and hasattr(item, _ATTR)


def decode_image(item: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """A placeholder's pixels as float patches [n_patches, 3*p*p] (augmented when it has a seed)."""
    raw, rng_key = getattr(item, _ATTR)
    augment = rng_key is not None
    patches = process_image(raw, cfg.image_size, cfg.patch_size, augment=augment,
                            scale=(cfg.crop_scale_min, cfg.crop_scale_max), hflip_prob=cfg.hflip_prob,
                            rng=np.random.default_rng(rng_key) if augment else None)
    if patches.shape[0] != item.shape[0]:  # packing planned with the other length
        raise RuntimeError(f"decode_image: image gave {patches.shape[0]} patches, packing planned "
                           f"{item.shape[0]} (image_size {cfg.image_size}, patch_size {cfg.patch_size})")
    return patches


def materialise_rows(rows: list[list[Piece]], decode: Callable[[torch.Tensor], torch.Tensor],
                     pool=None) -> list[list[Piece]]:
    """The same rows with every placeholder replaced by its decoded patches (in a thread pool
    when given one: PIL releases the GIL while decoding and resizing)."""
    lazies = [it for row in rows for p in row for it in p.items if is_lazy(it)]
    if not lazies:
        return rows
    decoded = list(pool.map(decode, lazies)) if pool is not None else [decode(it) for it in lazies]
    by_id = {id(ph): px for ph, px in zip(lazies, decoded)}
    return [[dataclasses.replace(p, items=[by_id.get(id(it), it) if is_lazy(it) else it for it in p.items])
             for p in row] for row in rows]
