"""Where every sample of an ingest went: counts by reason, and the checks that make a bad run loud.

`IngestStats` is kept per input file (in its done-file) and summed over the run. The counts add
up: `read` (samples the readers found: documents, pairs, lines with a record, tar samples) ==
`samples - split_added + sum(skipped.values())`, where `split_added` is the extra documents that
splitting long documents created. File-level happenings that are not samples (an empty input, a
stream cut at an unknown point, an input that could not be read at all) are `events`. Images
dropped from documents that were kept are `dropped_images`.

`problems()` turns a run's stats into the reasons to exit non-zero (tools/prepare_data.py): no
sample, no image for an image source, more than `max_skip_fraction` of the samples skipped, or an
input that failed; each comes with the most frequent reasons and an example of each.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

from pretrain.data.ingest.io import Skip

log = logging.getLogger("pretrain.data.ingest")


@dataclass
class IngestStats:
    """Counts of one task (input file) or of the whole run (sum of tasks)."""
    read: int = 0  # samples the readers found (kept or skipped)
    samples: int = 0  # written (after splitting long documents)
    val_samples: int = 0  # of which in the val split
    images: int = 0  # written
    text_tokens: int = 0  # written
    reencoded: int = 0  # images that had to be decoded, resized and re-encoded
    skipped: dict = field(default_factory=dict)  # reason -> samples skipped
    dropped_images: dict = field(default_factory=dict)  # reason -> images dropped from kept docs
    events: dict = field(default_factory=dict)  # reason -> file-level events (not samples)
    truncated_captions: int = 0  # captions cut to IngestConfig.max_caption_tokens
    split_documents: int = 0  # documents longer than IngestConfig.max_doc_tokens, split
    split_added: int = 0  # extra documents those splits created
    examples: dict = field(default_factory=dict)  # reason -> "place: detail" of its first case
    failed_inputs: dict = field(default_factory=dict)  # input path -> error (not in the manifest)
    heldout: dict = field(default_factory=dict)  # the run's held-out decision (heldout.py)
    seconds: float = 0.0

    def add(self, other: "IngestStats") -> None:
        for name in ("read", "samples", "val_samples", "images", "text_tokens", "reencoded",
                     "truncated_captions", "split_documents", "split_added", "seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for mine, theirs in [(self.skipped, other.skipped), (self.dropped_images, other.dropped_images),
                             (self.events, other.events)]:
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v
        for k, v in other.examples.items():
            self.examples.setdefault(k, v)
        self.failed_inputs.update(other.failed_inputs)

    @classmethod
    def from_dict(cls, d: dict) -> "IngestStats":
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in known})


class SkipLog:
    """Counts skips by reason into the right table; logs the first few of each reason per file."""

    def __init__(self, stats: IngestStats, per_reason: int = 5):
        self.stats, self.per_reason, self.seen = stats, per_reason, Counter()

    def skip(self, s: Skip, table: Optional[dict] = None) -> None:
        if table is None:
            table = self.stats.skipped if s.samples > 0 else self.stats.events
        table[s.reason] = table.get(s.reason, 0) + max(s.samples, 1)
        self.stats.examples.setdefault(s.reason, f"{s.where}: {s.detail[:200]}")
        self.seen[s.reason] += 1
        if self.seen[s.reason] <= self.per_reason:
            log.warning("skipped (%s) at %s: %s", s.reason, s.where, s.detail[:200])


# Hints printed with a reason when it is among the most frequent ones.
_HINTS = {
    "remote_image": "the records hold image URLs: rerun with --download",
    "missing_caption": "is the caption in another column? --caption-column",
    "missing_text": "is the text in another field? --text-field",
    "missing_image": "is the image in another column? --image-column",
    "image_path_outside_root": "image paths leave the input's folder: pass --image-root",
}


def top_reasons(stats: IngestStats, n: int = 5) -> list[str]:
    """The most frequent reasons over skipped samples, dropped images and events, with examples."""
    counts = Counter(stats.skipped) + Counter(stats.dropped_images) + Counter(stats.events)
    lines = []
    for reason, c in counts.most_common(n):
        hint = f" ({_HINTS[reason]})" if reason in _HINTS else ""
        lines.append(f"{reason}: {c}{hint}; e.g. {stats.examples.get(reason, '?')}")
    return lines


def problems(stats: IngestStats, needs_images: bool, max_skip_fraction: float) -> list[str]:
    """Reasons why this run must not pass for a success (empty: it may)."""
    out = []
    for path, err in stats.failed_inputs.items():
        out.append(f"input {path} failed: {err}")
    if stats.samples == 0:
        out.append("no sample was written")
    elif needs_images and stats.images == 0:
        out.append("no image was written (an image source that became text only)")
    skipped = sum(stats.skipped.values())
    if stats.read and skipped / stats.read > max_skip_fraction:
        out.append(f"{skipped} of {stats.read} samples ({skipped / stats.read:.0%}) were skipped, more "
                   f"than --max-skip-fraction {max_skip_fraction:g}")
    return out
