"""The demo SFT's evidence: held-out VQA accuracy before and after instruction tuning, and with
noise instead of the images, per question kind (colour, shape, position).

    python tools/demo_sft.py            # what `make demo-sft` runs (data, ingest, SFT, this report)

Questions are asked in the chat template (`<|user|> image question <|end|> <|assistant|>`,
pretrain/evaluate/prompting.py) and answers scored with the VQAv2 normalisation and soft accuracy
(pretrain/evaluate/vqa_metric.py); every demo question has ten identical human answers, so the
score is exact-match accuracy of the normalised answer.
"""
from __future__ import annotations

import json
from pathlib import Path

from pretrain.evaluate.datasets import load_vqav2
from pretrain.evaluate.prompting import PromptConfig
from pretrain.evaluate.tasks import run_vqa
from pretrain.generate import GenerationConfig
from pretrain.generate.loading import load_for_generation

IMAGE_PATTERN = "{image_id:06d}.jpg"


def demo_vqa(checkpoint: str, data_dir: str, modes: tuple[str, ...] = ("real",), limit: int | None = None) -> dict:
    """{mode: run_vqa result} for the model at `checkpoint` on the demo's held-out questions."""
    d = Path(data_dir)
    examples = load_vqav2(d / "val_questions.json", d / "val_annotations.json", d / "images" / "val",
                          IMAGE_PATTERN, limit)
    lm = load_for_generation(checkpoint)
    gen = GenerationConfig(max_new_tokens=8)
    return {mode: run_vqa(lm, examples, PromptConfig(chat=True), gen, batch_size=64, images=mode,
                          progress=False)[0] for mode in modes}


def report(before: dict, after: dict, out: str | Path) -> str:
    """A table of accuracy per question kind; also written to OUT as JSON."""
    rows = [("pretrained, with the image", before["real"]), ("after SFT, with the image", after["real"]),
            ("after SFT, noise instead", after["noise"])]
    kinds = sorted(after["real"]["per_answer_type"])
    lines = [f"{'held-out VQA accuracy (%)':<30}" + "".join(f"{k:>10}" for k in kinds) + f"{'all':>10}"]
    for name, r in rows:
        lines.append(f"{name:<30}" + "".join(f"{r['per_answer_type'][k]:>10.1f}" for k in kinds)
                     + f"{r['accuracy']:>10.1f}")
    Path(out).write_text(json.dumps({"before": before, "after": after}, indent=1))
    return "\n".join(lines)
