"""The batch contract: `PackedBatch`, what every training and evaluation step consumes.

`B` rows of `T` tokens; a row holds several packed documents. Field meanings are those of
docs/architecture.md ("The batch contract"); this file is the single place they are written in code.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

IGNORE_INDEX = -100


@dataclass
class PackedBatch:
    tokens: torch.Tensor  # int64 [B, T]: text ids; any id at patch positions (ignored)
    patches: torch.Tensor  # float [P, C*p*p]: pixels of every patch, row-major order of appearance
    is_patch: torch.Tensor  # bool [B, T]: True at image-patch positions
    doc_ids: torch.Tensor  # int32 [B, T]: document index in its row; each padding token its own doc
    image_ids: torch.Tensor  # int32 [B, T]: image index in its row at patch positions, -1 elsewhere
    position_ids: torch.Tensor  # int32 [B, T]: position inside its document, from 0
    labels: torch.Tensor  # int64 [B, T]: next text token of the same document, else -100
    source_ids: torch.Tensor  # int8 [B, T]: data source of the token (index into the source list)

    def to(self, device, non_blocking: bool = False) -> "PackedBatch":
        return PackedBatch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                              for f in fields(self)})

    def pin_memory(self) -> "PackedBatch":
        """Page-locked copies (torch DataLoader's pin_memory thread calls this)."""
        return PackedBatch(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})

    def with_patches(self, patches: torch.Tensor) -> "PackedBatch":
        """The same batch with other pixels (e.g. noise, for the image-reading probe)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["patches"] = patches
        return PackedBatch(**d)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.tokens.shape)

    def validate(self) -> None:
        """Check the contract's invariants; raises ValueError naming the broken field."""
        B, T = self.tokens.shape
        for name, dtype in [("tokens", torch.int64), ("is_patch", torch.bool), ("doc_ids", torch.int32),
                            ("image_ids", torch.int32), ("position_ids", torch.int32),
                            ("labels", torch.int64), ("source_ids", torch.int8)]:
            t = getattr(self, name)
            if t.shape != (B, T):
                raise ValueError(f"PackedBatch.{name}: shape {tuple(t.shape)}, expected {(B, T)}")
            if t.dtype != dtype:
                raise ValueError(f"PackedBatch.{name}: dtype {t.dtype}, expected {dtype}")
        n_patch = int(self.is_patch.sum())
        if self.patches.dim() != 2 or self.patches.shape[0] != n_patch:
            raise ValueError(f"PackedBatch.patches: shape {tuple(self.patches.shape)}, expected [{n_patch}, C*p*p]")
        if bool(((self.image_ids >= 0) != self.is_patch).any()):
            raise ValueError("PackedBatch.image_ids: must be >= 0 exactly at patch positions")


def collate(batches: list[PackedBatch]) -> PackedBatch:
    """Stack several batches along rows (patches concatenated in the same row-major order)."""
    d = {}
    for f in fields(PackedBatch):
        d[f.name] = torch.cat([getattr(b, f.name) for b in batches], dim=0)
    return PackedBatch(**d)
