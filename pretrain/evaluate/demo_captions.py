"""The demo's captioning evidence: greedy captions for held-out demo images, CIDEr-D with the
images and with noise instead, printed and drawn on a contact sheet in the run directory.

Called at the end of training when `train.image_probe` is on (the demo recipes), on rank 0:

    RUN_DIR/captions.json     CIDEr-D real vs noise, and every generated caption with its reference
    RUN_DIR/captions.png      the first images with generated caption and reference

Cheap on purpose (a few dozen images, captions of at most 16 tokens, greedy, one batch): it
must not lengthen `make demo` noticeably on 2 CPU cores. CIDEr-D uses the Java-free tokenisation
so the numbers do not depend on whether Java is installed.
"""
from __future__ import annotations

import json
from pathlib import Path

from pretrain.evaluate.datasets import CaptionExample, load_image
from pretrain.evaluate.prompting import PromptConfig
from pretrain.evaluate.tasks import run_captioning
from pretrain.generate import GenerationConfig, InferenceModel


def demo_caption_examples(root: str, n: int) -> list[CaptionExample]:
    """The demo corpus's first n held-out captions (tools/make_demo_data.py) as caption examples."""
    from pretrain.data.corpora.demo import probe_examples
    return [CaptionExample(ex.key, ex.image, [ex.caption]) for ex in probe_examples(root, "val", n)]


def caption_sheet(path: Path, examples: list[CaptionExample], records: list[dict], n: int, title: str) -> Path:
    from pretrain.evaluate.contact_sheet import contact_sheet
    items = [{"image": load_image(ex.image), "caption": r["caption"], "reference": ex.references[0]}
             for ex, r in zip(examples[:n], records[:n])]
    return contact_sheet(items, path, title=title)


def caption_demo(lm: InferenceModel, data_root: str, run_dir: Path, n_images: int = 48, show: int = 8,
                 max_new_tokens: int = 16) -> dict:
    """Generate, score real vs noise, write captions.json and captions.png; returns the summary."""
    examples = demo_caption_examples(data_root, n_images)
    gen = GenerationConfig(max_new_tokens=max_new_tokens)
    real, records = run_captioning(lm, examples, PromptConfig(), gen, batch_size=len(examples),
                                   tokenizer="python", images="real", progress=False)
    noise, noise_records = run_captioning(lm, examples, PromptConfig(), gen, batch_size=len(examples),
                                          tokenizer="python", images="noise", progress=False)
    run_dir = Path(run_dir)
    png = caption_sheet(run_dir / "captions.png", examples, records, 16,
                        f"held-out demo images, step {lm.step}: CIDEr-D {real['cider']:.3f} "
                        f"(noise instead of the image: {noise['cider']:.3f})")
    exact = sum(r["caption"] == r["references"][0] for r in records)
    summary = {"images": len(examples), "cider_real": real["cider"], "cider_noise": noise["cider"],
               "exact_real": exact, "exact_noise": sum(r["caption"] == r["references"][0] for r in noise_records),
               "tokenizer": real["tokenizer"], "max_new_tokens": max_new_tokens, "png": str(png),
               "captions": [{"key": r["image_id"], "generated": r["caption"], "reference": r["references"][0],
                             "generated_from_noise": n["caption"]} for r, n in zip(records, noise_records)]}
    (run_dir / "captions.json").write_text(json.dumps(summary, indent=2) + "\n")
    for r in records[:show]:
        print(f"[captions] {r['image_id']}: generated \"{r['caption']}\" | reference \"{r['references'][0]}\"",
              flush=True)
    print(f"[captions] CIDEr-D on {len(examples)} held-out images: {real['cider']:.3f} with the image, "
          f"{noise['cider']:.3f} with noise instead (captions equal to the reference: {exact} and "
          f"{summary['exact_noise']}); contact sheet {png}", flush=True)
    return {k: v for k, v in summary.items() if k != "captions"}


def demo_model(module, cfg, run_dir: Path, step: int) -> InferenceModel:
    """The trained module itself when this rank holds all of it (ZeRO 0-2 without expert
    parallelism: its forward needs no other rank); otherwise the run's final checkpoint,
    consolidated (ZeRO-3 shards, experts spread over ranks)."""
    if cfg.train.zero_stage < 3 and (cfg.model.kind != "moe" or cfg.model.moe.expert_parallel_size == 1):
        return InferenceModel.from_run_config(module, cfg, source=str(run_dir), step=step)
    from pretrain.generate import load_for_generation
    return load_for_generation(str(run_dir), device=next(module.parameters()).device)
