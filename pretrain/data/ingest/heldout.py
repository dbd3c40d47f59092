"""The held-out (val) split of one source: a fraction of its documents, and at least a minimum.

A document goes to val when the stable hash of its key falls below the source's val fraction
(`pretrain.data.shards.split_of`), so the split never depends on the order or the machine. With
the fraction alone a small source gets almost nothing held out (1% of 200 documents is 2), so
each source also has a minimum, `IngestConfig.val_min_docs`. Before the ingest, the documents
are counted (by running the reader, stopping as soon as there are enough for the fraction alone
to give the minimum, ceil(val_min_docs / val_fraction) documents); when there are fewer, the
fraction is raised to exactly the k-th smallest key position, k = max(ceil(fraction * n),
val_min_docs) but at most half of the documents. Documents later skipped for bad data leave the
val split a little smaller than k; the run summary states what was reserved.

The decision is written to OUT/.ingest/{source}/heldout.json and reused by a restarted run, so
inputs already done and inputs still to do are split by the same rule.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Callable, Iterable

from pretrain.data.shards import split_position

log = logging.getLogger("pretrain.data.ingest")


def heldout_fraction(cfg, keys_of: Callable[[], Iterable[str]]) -> dict:
    """{"val_fraction", "val_min_docs", "effective_val_fraction", "documents_counted"} for this
    source; keys_of() yields the source's final (clean, qualified) document keys in input order."""
    path = os.path.join(cfg.output, ".ingest", cfg.source, "heldout.json")
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        if (saved["val_fraction"], saved["val_min_docs"]) == (cfg.val_fraction, cfg.val_min_docs):
            return saved
        raise ValueError(f"{path}: the interrupted run used val_fraction={saved['val_fraction']} and "
                         f"val_min_docs={saved['val_min_docs']}; rerun with those or use a fresh --output")
    decision = {"val_fraction": cfg.val_fraction, "val_min_docs": cfg.val_min_docs,
                "effective_val_fraction": cfg.val_fraction, "documents_counted": None}
    if cfg.val_fraction > 0 and cfg.val_min_docs > 0:
        enough = math.ceil(cfg.val_min_docs / cfg.val_fraction)
        seen: set[str] = set()
        for key in keys_of():
            seen.add(key)
            if len(seen) >= enough:
                break
        if len(seen) < enough:
            n = len(seen)
            k = min(max(math.ceil(cfg.val_fraction * n), cfg.val_min_docs), n // 2)
            pos = sorted(split_position(key) for key in seen)
            # Halfway between the k-th and (k+1)-th smallest positions: exactly k keys fall below.
            eff = 0.0 if k == 0 else (pos[k - 1] + pos[k]) / 2
            decision.update(effective_val_fraction=eff, documents_counted=n)
            log.info("held-out split of %s: %d of %d documents (val_fraction %g would give %d)",
                     cfg.source, k, n, cfg.val_fraction, sum(p < cfg.val_fraction for p in pos))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(decision, f, indent=1)
    os.replace(path + ".tmp", path)
    return decision
