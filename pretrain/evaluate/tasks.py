"""Captioning and VQA: generate for every example in batches, then score.

    result, records = run_captioning(lm, examples, PromptConfig(), GenerationConfig(max_new_tokens=20))
    result -> {"task": "captioning", "examples": n, "cider": ..., "tokenizer": ..., ...}
    records -> one dict per example: id, prompt settings, generated text, references, score

`images="noise"` replaces every query image by uniform noise (seeded per example): the control
that shows how much of a score comes from reading the pixels.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from tqdm import tqdm

from pretrain.evaluate.cider import cider_d
from pretrain.evaluate.datasets import CaptionExample, VQAExample
from pretrain.evaluate.prompting import PromptConfig, caption_prompt, vqa_prompt
from pretrain.evaluate.vqa_metric import vqa_accuracy
from pretrain.generate import GenerationConfig, InferenceModel, generate

IMAGE_MODES = ("real", "noise")


def noise_image(lm: InferenceModel, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 7919])
    return rng.integers(0, 256, (lm.image_size, lm.image_size, 3), dtype=np.uint8)


def _generate_all(lm, n: int, make_prompt, gen_cfg: GenerationConfig, batch_size: int, desc: str,
                  progress: bool) -> list:
    outs = []
    for start in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, unit="batch"):
        prompts = [make_prompt(i) for i in range(start, min(start + batch_size, n))]
        outs += generate(lm, prompts, gen_cfg)
    return outs


def _with_stops(gen_cfg: GenerationConfig, prompt_cfg: PromptConfig) -> GenerationConfig:
    stops = list(dict.fromkeys(list(gen_cfg.stop) + prompt_cfg.stop_strings()))
    return GenerationConfig(**{**gen_cfg.__dict__, "stop": stops})


def _check_mode(images: str) -> None:
    if images not in IMAGE_MODES:
        raise ValueError(f"images={images!r}: expected one of {IMAGE_MODES}")


def run_captioning(lm: InferenceModel, examples: list[CaptionExample], prompt_cfg: PromptConfig,
                   gen_cfg: GenerationConfig, batch_size: int = 16, tokenizer: str = "auto",
                   images: str = "real", progress: bool = True) -> tuple[dict, list[dict]]:
    _check_mode(images)
    query = (lambda i: noise_image(lm, i)) if images == "noise" else (lambda i: None)
    outs = _generate_all(lm, len(examples), lambda i: caption_prompt(examples, i, prompt_cfg, query(i)),
                         _with_stops(gen_cfg, prompt_cfg), batch_size, f"captioning ({images})", progress)
    cands = {ex.image_id: g.text.strip() for ex, g in zip(examples, outs)}
    scores = cider_d(cands, {ex.image_id: ex.references for ex in examples}, tokenizer)
    records = [{"image_id": ex.image_id, "image": str(ex.image) if not hasattr(ex.image, "size") else None,
                "caption": cands[ex.image_id], "references": ex.references,
                "cider": scores["per_image"][ex.image_id], "finish_reason": g.finish_reason}
               for ex, g in zip(examples, outs)]
    result = {"task": "captioning", "images": images, "examples": len(examples), "cider": scores["cider"],
              "tokenizer": scores["tokenizer"], "shots": prompt_cfg.shots,
              "mean_words": float(np.mean([len(c.split()) for c in cands.values()]))}
    return result, records


def run_vqa(lm: InferenceModel, examples: list[VQAExample], prompt_cfg: PromptConfig,
            gen_cfg: GenerationConfig, batch_size: int = 16, images: str = "real",
            progress: bool = True) -> tuple[dict, list[dict]]:
    _check_mode(images)
    if prompt_cfg.chat:  # the model's own chat markers; its answer ends at <|end|>
        prompt_cfg = dataclasses.replace(prompt_cfg, chat_ids=lm.tokenizer.chat_ids())
        gen_cfg = dataclasses.replace(gen_cfg, stop_ids=list(gen_cfg.stop_ids) + [prompt_cfg.chat_ids[2]])
    query = (lambda i: noise_image(lm, i)) if images == "noise" else (lambda i: None)
    outs = _generate_all(lm, len(examples), lambda i: vqa_prompt(examples, i, prompt_cfg, query(i)),
                         _with_stops(gen_cfg, prompt_cfg), batch_size, f"VQA ({images})", progress)
    records, by_type = [], {}
    for ex, g in zip(examples, outs):
        answer = g.text.strip().split("\n")[0]
        acc = vqa_accuracy(answer, ex.answers)
        by_type.setdefault(ex.answer_type or "all", []).append(acc)
        records.append({"question_id": ex.question_id, "image_id": ex.image_id, "question": ex.question,
                        "answer": answer, "answers": ex.answers, "accuracy": acc})
    accs = [r["accuracy"] for r in records]
    result = {"task": "vqa", "images": images, "examples": len(examples),
              "accuracy": 100.0 * float(np.mean(accs)), "shots": prompt_cfg.shots,
              "per_answer_type": {k: 100.0 * float(np.mean(v)) for k, v in sorted(by_type.items())}}
    return result, records
