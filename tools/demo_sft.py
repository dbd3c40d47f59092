"""The demo's instruction-tuning stage, end to end (what `make demo-sft` runs after `make demo`).

    python tools/demo_sft.py [--pretrained runs/demo] [--data data/demo_sft]

1. writes LLaVA-format conversations about new demo images and held-out VQAv2-format questions
   (tools/make_sft_demo_data.py, pretrain/sft/demo.py);
2. ingests them like any LLaVA release (`tools/prepare_data.py llava`: one document per
   conversation, chat template, loss on the answers);
3. fine-tunes the pretrained demo with `CONFIG=pretrain/configs/sft_demo.yaml ./launch.sh`
   (`train.init_from` = the pretrained run; 2 DeepSpeed ranks on CPU);
4. prints held-out VQA accuracy per question kind: the pretrained model, the tuned one, and the
   tuned one with noise instead of the images (pretrain/sft/demo_vqa.py).
Every step is idempotent: a second run reuses the data, resumes the finished run and re-reports.
About 3 minutes on 2 CPU cores.
"""
import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from pretrain.data.ingest.driver import IngestConfig, run_ingest  # noqa: E402
from pretrain.data.ingest.llava import read_llava  # noqa: E402
from pretrain.sft.demo import make_demo_sft_data  # noqa: E402
from pretrain.sft.demo_vqa import demo_vqa, report  # noqa: E402

SFT_CONFIG = "pretrain/configs/sft_demo.yaml"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrained", default="runs/demo", help="the pretraining run to tune")
    ap.add_argument("--data", default="data/demo_sft")
    ap.add_argument("--run-dir", default="runs/demo_sft")
    ap.add_argument("--tokenizer", default="data/demo/tokenizer.model")
    a = ap.parse_args()
    os.chdir(REPO)
    paths = make_demo_sft_data(a.data)
    shards = os.path.join(a.data, "shards")
    if not os.path.isfile(os.path.join(shards, "manifest.json")):
        stats = run_ingest([paths["train"]], IngestConfig(
            output=shards, tokenizer=a.tokenizer, source="sft", val_fraction=0.05, val_min_docs=32,
            image_size=48, min_image_size=16, max_doc_tokens=256, image_tokens=18, progress=False), read_llava)
        print(f"[demo-sft] ingested {stats.samples} conversations ({stats.images} images), "
              f"skipped {sum(stats.skipped.values())}", flush=True)
    env = dict(os.environ, CONFIG=SFT_CONFIG)
    cmd = ["./launch.sh", f"train.init_from={a.pretrained}", f"run.dir={a.run_dir}", f"data.root={shards}"]
    print("[demo-sft] " + " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, env=env)
    if rc != 0:
        print(f"[demo-sft] training failed (exit {rc})", file=sys.stderr)
        return rc
    before = demo_vqa(a.pretrained, a.data)
    after = demo_vqa(a.run_dir, a.data, modes=("real", "noise"))
    print(report(before, after, os.path.join(a.run_dir, "vqa.json")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
