"""Packing statistics of a config's training loader: padding and the realised mixture.

    python tools/pack_stats.py pretrain/configs/demo.yaml --batches 200 --json
    python tools/pack_stats.py pretrain/configs/paper/early_275m.yaml data.root=/data/shards \
        'data.fill_rows_of=[caption]' --batches 500
    python tools/pack_stats.py CONFIG --synthetic /tmp/synth   # on a web-like synthetic corpus

Reads batches of rank 0 (world size --world-size, micro-batch from the config) and reports, over
--batches batches: the padding fraction (all rows, and inside the rows of each source), rows
and tokens per source (the realised mixture), images per row. Labels, not pixels, are what
differ between augmentations, so --no-augment gives the same packing faster. Statistics are
those of pretrain/data/stats.py, the same ones the loader exposes per step (`last_stats`).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pretrain.config import load_config  # noqa: E402
from pretrain.data import build_train_loader  # noqa: E402
from pretrain.data.stats import StatsAccumulator  # noqa: E402


def pack_stats(data_cfg, batches: int, micro_batch_size: int, world_size: int = 1,
               global_batch_size=None) -> dict:
    ld = build_train_loader(data_cfg, rank=0, world_size=world_size, micro_batch_size=micro_batch_size,
                            global_batch_size=global_batch_size)
    acc = StatsAccumulator(list(data_cfg.sources))
    for _ in range(batches):
        next(ld)
        acc.add(ld.last_stats)
    ld.close()
    out = acc.summary()
    out["config"] = {"seq_len": data_cfg.seq_len, "image_size": data_cfg.image_size,
                     "patch_size": data_cfg.patch_size, "pack_buffer": data_cfg.pack_buffer,
                     "weights": list(data_cfg.weights), "fill_rows_of": list(data_cfg.fill_rows_of),
                     "micro_batch_size": micro_batch_size, "world_size": world_size}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="section.field=value, as for launch.sh")
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--world-size", type=int, default=1)
    ap.add_argument("--synthetic", default=None, metavar="DIR",
                    help="build (once) and use a synthetic web-like corpus in DIR (overrides data.root)")
    ap.add_argument("--no-augment", action="store_true", help="skip crop/flip (same packing, faster)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    overrides = list(a.overrides)
    if a.synthetic:
        from pretrain.data.corpora.synthetic import make_synthetic_corpus
        if not os.path.isfile(os.path.join(a.synthetic, "manifest.json")):
            make_synthetic_corpus(a.synthetic, n_caption=3000, n_interleaved=1000, n_text=600)
        overrides += [f"data.root={a.synthetic}", "data.tokenizer=null"]
    if a.no_augment:
        overrides.append("data.augment=false")
    cfg = load_config(a.config, overrides)
    mbs = cfg.train.micro_batch_size
    gbs = cfg.train.global_batch_size if cfg.train.global_batch_size % (mbs * a.world_size) == 0 else None
    out = pack_stats(cfg.data, a.batches, mbs, a.world_size, gbs)
    if a.json:
        print(json.dumps(out, indent=1))
        return
    print(f"{out['batches']} batches, {out['rows']} rows of {cfg.data.seq_len}: padding {out['padding_frac']:.4f}")
    print(f"{'source':<14}{'rows':>8}{'row frac':>10}{'token frac':>12}{'pad in rows':>13}{'img/row':>9}")
    for name, s in out["per_source"].items():
        print(f"{name:<14}{s['rows']:>8}{s['row_frac']:>10.4f}{s['token_frac']:>12.4f}"
              f"{s['padding_frac_of_rows']:>13.4f}{s['images_per_row']:>9.2f}")


if __name__ == "__main__":
    main()
