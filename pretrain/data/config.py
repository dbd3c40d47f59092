"""`DataConfig`: every knob of the data pipeline, typed and documented in place.

The top-level config loader builds it from the `data:` section of a YAML recipe by field name,
so this stays a plain dataclass with defaults. `validate()` raises ValueError naming the field.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class DataConfig:
    # Directory holding manifest.json and the shards it lists (e.g. data/demo).
    root: str = "data/demo"
    # Data sources mixed in training; source_ids in PackedBatch index into this list.
    sources: list[str] = field(default_factory=lambda: ["caption", "interleaved", "text"])
    # Mixture weights, one per source, as fractions of rows (paper: 45/45/10); normalised here.
    weights: list[float] = field(default_factory=lambda: [0.45, 0.45, 0.10])
    # Tokens per packed row (T).
    seq_len: int = 256
    # Side of the square image fed to the model, in pixels (after crop/resize).
    image_size: int = 32
    # Side of a square patch in pixels; image_size must be a multiple of it.
    patch_size: int = 8
    # Worker processes that plan, decode, augment and lay out batches (torch DataLoader workers;
    # worker w builds batches w, w+N, ...). 0: all in the training process. Batches and resume
    # state are identical for every value, so it may change between runs of one job.
    num_workers: int = 0
    # Threads decoding a batch's images inside whichever process builds it (PIL releases the GIL
    # while decoding and resizing). 0: decode in the building thread. Never changes a batch.
    decode_threads: int = 0
    # Seed of every random choice (shard order, sample order, augmentation, mixture).
    seed: int = 0
    # Documents (or document pieces) held in the best-fit packing buffer, per source.
    pack_buffer: int = 64
    # Random resized crop: smallest fraction of the image area kept (paper: 0.4).
    crop_scale_min: float = 0.4
    # Random resized crop: largest fraction of the image area kept (paper: 1.0).
    crop_scale_max: float = 1.0
    # Probability of a horizontal flip (paper: 0.5).
    hflip_prob: float = 0.5
    # Augment training images (crop + flip); evaluation never augments.
    augment: bool = True
    # Tokenizer model path; None means the manifest's tokenizer (relative to root).
    tokenizer: Optional[str] = None
    # Sources whose rows get their tail (the room best fit leaves) filled with `fill_source`
    # documents, cut to fit (e.g. [caption]: caption rows hold 3-4 pairs of ~280 tokens at
    # T=1024 and would otherwise pad ~15%). Filled tokens carry fill_source's source_id.
    fill_rows_of: list[str] = field(default_factory=list)
    # The source that fills those tails (a separate cursor over its shards, own order).
    fill_source: str = "text"
    # Tails shorter than this stay padding (a fragment that short teaches next to nothing).
    fill_min_tokens: int = 8
    # Sources whose rows are completed by cutting a buffered document at the room best fit
    # leaves (never inside an image span): long interleaved documents leave ~5% padding at T=1024
    # otherwise. Captions are not cut (a caption cut from its image is noise): use fill_rows_of.
    cut_to_fit: list[str] = field(default_factory=lambda: ["interleaved", "text"])
    # Smallest room (and smallest head) worth a cut; smaller rooms stay padding.
    cut_min_tokens: int = 16

    # Which image markers are loss targets (pretrain/data/packing.py `MARKER_TARGETS`): "none"
    # (default: images are inputs only, every target is real text), "boi" (also predict where an
    # image starts), "both" (also <eoi>, which the fixed patch count fully determines; this
    # repo's behaviour before the option existed).
    image_marker_targets: str = "none"

    # Training data: "documents" (ingest shards under root, packed online) or "packed_rows" (rows
    # fixed offline by tools/pack_shards.py, read from rows_root; root still gives the val
    # documents and the tokenizer).
    format: str = "documents"
    # Directory of packed-row shards (manifest.json from tools/pack_shards.py); packed_rows only.
    rows_root: Optional[str] = None

    @property
    def n_patches(self) -> int:
        """Patch positions per image."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        """Values per flattened patch: C * p * p with C = 3 (RGB)."""
        return 3 * self.patch_size * self.patch_size

    def normalized_weights(self) -> list[float]:
        s = float(sum(self.weights))
        return [w / s for w in self.weights]

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if not self.root:
            raise ValueError("DataConfig.root: empty; expected the directory holding manifest.json")
        if not self.sources:
            raise ValueError("DataConfig.sources: empty list")
        if len(set(self.sources)) != len(self.sources):
            raise ValueError(f"DataConfig.sources: duplicates in {self.sources}")
        if len(self.sources) > 127:
            raise ValueError("DataConfig.sources: at most 127 sources (source_ids are int8)")
        if len(self.weights) != len(self.sources):
            raise ValueError(f"DataConfig.weights: {len(self.weights)} weights for {len(self.sources)} sources")
        if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
            raise ValueError(f"DataConfig.weights: must be >= 0 with a positive sum, got {self.weights}")
        if self.patch_size <= 0:
            raise ValueError(f"DataConfig.patch_size: must be > 0, got {self.patch_size}")
        if self.image_size <= 0 or self.image_size % self.patch_size:
            raise ValueError(f"DataConfig.image_size: {self.image_size} is not a positive multiple "
                             f"of patch_size {self.patch_size}")
        # The smallest row must hold BOS, one whole image span (<boi> patches <eoi>) and EOS.
        if self.seq_len < self.n_patches + 4:
            raise ValueError(f"DataConfig.seq_len: {self.seq_len} cannot hold one image "
                             f"({self.n_patches} patches + markers + BOS/EOS)")
        if self.image_marker_targets not in ("none", "boi", "both"):
            raise ValueError(f"DataConfig.image_marker_targets: {self.image_marker_targets!r}, expected "
                             f"'none', 'boi' or 'both'")
        if self.format not in ("documents", "packed_rows"):
            raise ValueError(f"DataConfig.format: {self.format!r}, expected 'documents' or 'packed_rows'")
        if self.format == "packed_rows" and not self.rows_root:
            raise ValueError("DataConfig.rows_root: format 'packed_rows' needs the directory written by "
                             "tools/pack_shards.py")
        if self.num_workers < 0:
            raise ValueError(f"DataConfig.num_workers: must be >= 0, got {self.num_workers}")
        if self.decode_threads < 0:
            raise ValueError(f"DataConfig.decode_threads: must be >= 0, got {self.decode_threads}")
        if self.pack_buffer < 1:
            raise ValueError(f"DataConfig.pack_buffer: must be >= 1, got {self.pack_buffer}")
        if not 0 < self.crop_scale_min <= self.crop_scale_max <= 1.0:
            raise ValueError(f"DataConfig.crop_scale_min/crop_scale_max: need 0 < min <= max <= 1, "
                             f"got {self.crop_scale_min}, {self.crop_scale_max}")
        for name in self.fill_rows_of:
            if name not in self.sources:
                raise ValueError(f"DataConfig.fill_rows_of: {name!r} is not in sources {self.sources}")
        if self.fill_rows_of and self.fill_source not in self.sources:
            raise ValueError(f"DataConfig.fill_source: {self.fill_source!r} is not in sources {self.sources}")
        if self.cut_min_tokens < 1:
            raise ValueError(f"DataConfig.cut_min_tokens: must be >= 1, got {self.cut_min_tokens}")
        if self.fill_min_tokens < 1:
            raise ValueError(f"DataConfig.fill_min_tokens: must be >= 1, got {self.fill_min_tokens}")
        if not 0.0 <= self.hflip_prob <= 1.0:
            raise ValueError(f"DataConfig.hflip_prob: must be in [0, 1], got {self.hflip_prob}")
