"""Per-batch data statistics: padding, tokens and rows per source, images per row.

`batch_stats(batch, sources, pad_id)` reads only the PackedBatch, so the training loop, the
loader (`TrainLoader.last_stats`) and tools/pack_stats.py all measure the same thing:
  * padding: positions holding the pad id outside image spans (pad is a control symbol that
    no text produces, and patch positions are excluded);
  * a row's source is the source of its first token (the mixture's unit; tail-filled caption
    rows count as caption rows, their filled tokens under the fill source);
  * tokens per source count every position (text, markers and patches) except padding.
`StatsAccumulator` sums batches and reports fractions (what pack_stats prints).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pretrain.batch import PackedBatch


def batch_stats(batch: PackedBatch, sources: list[str], pad_id: int) -> dict:
    """Counts of one batch (ints, plus two fractions). numpy, not torch: no intra-op threads."""
    B, T = batch.shape
    tokens, is_patch = batch.tokens.numpy(), batch.is_patch.numpy()
    src_BT = batch.source_ids.numpy().astype(np.int64)
    pad_BT = (tokens == pad_id) & ~is_patch
    n_src = len(sources)
    tokens_S = np.bincount(src_BT[~pad_BT], minlength=n_src)
    row_src_B = src_BT[:, 0]
    starts_BT = is_patch.copy()
    starts_BT[:, 1:] &= ~is_patch[:, :-1]  # first patch of each image (spans never touch)
    images_B = starts_BT.sum(1)
    pad_B = pad_BT.sum(1)
    out = {"rows": B, "tokens": B * T, "padding": int(pad_B.sum()),
           "padding_frac": float(pad_B.sum()) / (B * T), "images_per_row": float(images_B.mean()) if B else 0.0}
    for s, name in enumerate(sources):
        sel = row_src_B == s
        out[f"rows/{name}"] = int(sel.sum())
        out[f"tokens/{name}"] = int(tokens_S[s])
        out[f"padding/{name}_rows"] = int(pad_B[sel].sum())
        out[f"images/{name}_rows"] = int(images_B[sel].sum())
    return out


@dataclass
class StatsAccumulator:
    """Sums batch_stats over batches; `summary()` gives fractions per source."""
    sources: list[str]
    totals: dict = field(default_factory=dict)
    batches: int = 0

    def add(self, st: dict) -> None:
        self.batches += 1
        for k, v in st.items():
            if isinstance(v, int):
                self.totals[k] = self.totals.get(k, 0) + v

    def summary(self) -> dict:
        t = self.totals
        rows, toks = max(t.get("rows", 0), 1), max(t.get("tokens", 0), 1)
        out = {"batches": self.batches, "rows": t.get("rows", 0), "tokens": t.get("tokens", 0),
               "padding_frac": t.get("padding", 0) / toks, "per_source": {}}
        real = max(toks - t.get("padding", 0), 1)
        for name in self.sources:
            n_rows = t.get(f"rows/{name}", 0)
            out["per_source"][name] = {
                "rows": n_rows, "row_frac": n_rows / rows,
                "tokens": t.get(f"tokens/{name}", 0), "token_frac": t.get(f"tokens/{name}", 0) / real,
                # padding inside this source's rows, as a fraction of those rows' positions
                "padding_frac_of_rows": t.get(f"padding/{name}_rows", 0) / max(n_rows * (toks // rows), 1),
                "images_per_row": t.get(f"images/{name}_rows", 0) / max(n_rows, 1)}
        return out
