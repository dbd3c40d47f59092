"""Evaluation output: results as JSON (one file per run of tools/evaluate.py, merged by task),
per-example records as JSONL, and a short table for the terminal."""
from __future__ import annotations

import json
from pathlib import Path

HEADLINE = {"captioning": ("cider", "CIDEr-D"), "vqa": ("accuracy", "VQA acc. %"), "heldout": ("loss/avg", "loss (avg)")}


def write_results(out_dir: str | Path, name: str, result: dict, records: list[dict] | None = None) -> Path:
    """`out_dir/results.json` gains (or replaces) entry `name`; records go to `out_dir/name.jsonl`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    merged = json.loads(path.read_text()) if path.is_file() else {}
    merged[name] = result
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(merged, indent=2, default=str) + "\n")
    tmp.replace(path)
    if records is not None:
        with open(out / f"{name}.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps(r, default=str) + "\n")
    return path


def table(results: dict[str, dict]) -> str:
    """One line per result: name, headline metric, examples, and the details that matter."""
    rows = [("run", "metric", "value", "examples", "notes")]
    for name, r in results.items():
        key, label = HEADLINE.get(r.get("task", ""), ("", ""))
        value = r.get(key)
        notes = ", ".join(f"{k}={v}" for k, v in r.items()
                          if k in ("images", "shots", "tokenizer") and v not in (None, ""))
        if r.get("task") == "heldout":
            notes = ", ".join(f"{k[5:]} {v:.4f}" for k, v in r.items() if k.startswith("loss/") and k != "loss/avg")
        rows.append((name, label, "-" if value is None else f"{value:.4f}", str(r.get("examples", "-")), notes))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)
