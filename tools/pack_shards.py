"""Pack training shards into fixed rows offline (the online packer's rows, stored once).

    python tools/pack_shards.py --input data/demo --output data/demo_rows --seq-len 256 \
        [--config pretrain/configs/demo.yaml] [--fill-text [DIR]] [--workers 2] [--epochs 1]

Reads the train shards of every --input (ingest output: tools/prepare_data.py or
tools/make_demo_data.py), packs each source's documents into rows of --seq-len tokens with the
online loader's own code (same best fit, same pieces, same seed), and writes row shards
(images still JPEG: crops run at load time) plus a manifest with rows, tokens, padding and images
per shard and per source. Train from them with `data.format=packed_rows data.rows_root=OUTPUT`.
--config takes the data section of a recipe (sources, weights, seed, image/patch size, buffer,
tail filling); the flags override it. --fill-text fills the tail of caption rows with text
(DIR, if given, is read as one more input holding the text source).
Re-running with the same arguments skips completed shards. Logic: pretrain/data/offline/pack.py.
"""
import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pretrain.data.config import DataConfig  # noqa: E402
from pretrain.data.offline.pack import pack_shards, report_dict  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", required=True, help="ingest output directories (manifest.json)")
    ap.add_argument("--output", required=True)
    ap.add_argument("--config", help="YAML recipe whose data section gives the packing fields")
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--image-size", type=int)
    ap.add_argument("--patch-size", type=int)
    ap.add_argument("--pack-buffer", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--sources", nargs="+")
    ap.add_argument("--weights", nargs="+", type=float, help="a source of weight 0 is not packed")
    ap.add_argument("--fill-text", nargs="?", const="", default=None, metavar="DIR",
                    help="fill caption row tails with text (DIR: extra input holding the text source)")
    ap.add_argument("--epochs", type=int, default=1, help="passes over each source's documents")
    ap.add_argument("--max-rows", type=int, help="cap on rows per source (samples, tests)")
    ap.add_argument("--rows-per-shard", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--world-size", type=int, default=1,
                    help="data-parallel ranks the rows are packed for: training on that many ranks "
                         "then reproduces the online loader batch for batch")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args()

    if a.config:
        from pretrain.config import load_config
        cfg = load_config(a.config).data
    else:
        cfg = DataConfig()
    over = {k: v for k, v in [("seq_len", a.seq_len), ("image_size", a.image_size), ("patch_size", a.patch_size),
                              ("pack_buffer", a.pack_buffer), ("seed", a.seed), ("sources", a.sources),
                              ("weights", a.weights)] if v is not None}
    inputs = list(a.input)
    if a.fill_text is not None:
        over.update(fill_rows_of=["caption"], fill_source="text")
        if a.fill_text:
            inputs.append(a.fill_text)
    cfg = dataclasses.replace(cfg, **over)
    if a.sources and not a.weights and len(cfg.weights) != len(cfg.sources):
        cfg.weights = [1.0] * len(cfg.sources)
    try:
        cfg.validate()
        r = pack_shards(inputs, a.output, cfg, epochs=a.epochs, max_rows=a.max_rows,
                        rows_per_shard=a.rows_per_shard, workers=a.workers, progress=not a.no_progress,
                        world_size=a.world_size)
    except ValueError as e:
        print(f"pack_shards: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report_dict(r), indent=1))
    with open(os.path.join(a.output, "manifest.json")) as f:
        per = json.load(f)["per_source"]
    for src, d in per.items():
        print(f"{src:12s} rows {d['rows']:8d}  tokens {d['tokens']:11d}  images {d['images']:8d}  "
              f"padding {100 * d['padding_fraction']:.2f}%")
    # Failed output shards mean missing rows: say so in the exit status (inputs skipped do not).
    return 1 if r.shards_failed else 0


if __name__ == "__main__":
    sys.exit(main())
