"""Evaluation plumbing: COCO-caption and VQAv2 files, prompts with shots, captioning and VQA runs
scored by the metrics, results/table/contact sheet, and the errors bad input gets.

    python -m pytest tests/test_evaluate_tasks.py -q
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pretrain.data.tokenizer import Tokenizer
from pretrain.evaluate.cider import cider_d
from pretrain.evaluate.contact_sheet import contact_sheet
from pretrain.evaluate.datasets import load_coco_captions, load_vqav2
from pretrain.evaluate.prompting import PromptConfig, caption_prompt, pick_shots, vqa_prompt
from pretrain.evaluate.report import table, write_results
from pretrain.evaluate.tasks import run_captioning, run_vqa
from pretrain.evaluate.vqa_metric import vqa_accuracy
from pretrain.generate import GenerationConfig, InferenceModel
from tests.test_generate import IMAGE, PATCH, tiny_model


@pytest.fixture(scope="module")
def lm(tiny_demo):
    tok = Tokenizer(str(tiny_demo / "tokenizer.model"))
    return InferenceModel(tiny_model("early", tok.vocab_size, seed=0), tok, IMAGE, PATCH)


@pytest.fixture()
def coco(tmp_path):
    rng = np.random.default_rng(0)
    images = []
    for i in (3, 1, 2):
        name = f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / name)
        images.append({"id": i, "file_name": name})
    images.append({"id": 9, "file_name": "no_captions.png"})  # not in the caption set: ignored
    anns = [{"image_id": i, "caption": c} for i, c in
            [(1, "a red circle."), (1, "A red round thing"), (2, "a blue square"), (3, "two green crosses")]]
    (tmp_path / "captions.json").write_text(json.dumps({"images": images, "annotations": anns}))
    qs = [{"question_id": 10 + i, "image_id": i, "question": f"what is in picture {i}?"} for i in (1, 2, 3)]
    answers = {1: ["circle"] * 6 + ["ball"] * 4, 2: ["2"] * 10, 3: ["yes", "no"] * 5}
    vqa_anns = [{"question_id": 10 + i, "image_id": i, "answer_type": "number" if i == 2 else "other",
                 "answers": [{"answer": a, "answer_id": k} for k, a in enumerate(answers[i])]} for i in (1, 2, 3)]
    (tmp_path / "q.json").write_text(json.dumps({"questions": qs}))
    (tmp_path / "a.json").write_text(json.dumps({"annotations": vqa_anns}))
    return tmp_path


def test_coco_captions_load_sorted_and_checked(coco):
    ex = load_coco_captions(coco / "captions.json", coco)
    assert [e.image_id for e in ex] == [1, 2, 3]
    assert ex[0].references == ["a red circle.", "A red round thing"]
    assert [e.image_id for e in load_coco_captions(coco / "captions.json", coco, limit=2)] == [1, 2]
    (coco / "img2.png").unlink()
    with pytest.raises(ValueError, match="1 of 3 images.*img2.png"):
        load_coco_captions(coco / "captions.json", coco)
    (coco / "bad.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="no 'annotations' list"):
        load_coco_captions(coco / "bad.json", coco)


def test_vqa_loads_with_image_pattern(coco):
    ex = load_vqav2(coco / "q.json", coco / "a.json", coco, image_pattern="img{image_id}.png")
    assert [e.question_id for e in ex] == [11, 12, 13]
    assert ex[0].answer == "circle" and len(ex[0].answers) == 10
    with pytest.raises(ValueError, match="images are not in"):
        load_vqav2(coco / "q.json", coco / "a.json", coco)  # default COCO file names do not exist here


def test_shots_exclude_the_query_and_follow_the_seed(coco):
    cfg = PromptConfig(shots=2, seed=5)
    for i in range(3):
        shots = pick_shots(i, 3, cfg)
        assert i not in shots and len(set(shots)) == 2
        assert shots == pick_shots(i, 3, cfg)
    ex = load_coco_captions(coco / "captions.json", coco)
    parts = caption_prompt(ex, 0, PromptConfig(shots=2, caption_prompt="Caption:"))
    # shot image, shot text, shot image, shot text, query image, query text
    assert [type(p) for p in parts] == [bytes, str, bytes, str, bytes, str]
    assert parts[1] in ("a blue square\n", "two green crosses\n") and parts[-1] == "Caption:"
    assert parts[-2] == (coco / "img1.png").read_bytes()
    vqa = load_vqav2(coco / "q.json", coco / "a.json", coco, image_pattern="img{image_id}.png")
    assert vqa_prompt(vqa, 1, PromptConfig())[1] == "Question: what is in picture 2? Answer:"
    assert PromptConfig(shots=1).stop_strings() == ["\n"] and PromptConfig().stop_strings() == []
    with pytest.raises(ValueError, match="more than 3 examples"):
        pick_shots(0, 3, PromptConfig(shots=3))


def test_captioning_and_vqa_runs_are_scored_by_the_metrics(coco, lm, tmp_path):
    ex = load_coco_captions(coco / "captions.json", coco)
    gen = GenerationConfig(max_new_tokens=6)
    result, records = run_captioning(lm, ex, PromptConfig(), gen, batch_size=2, tokenizer="python", progress=False)
    again = cider_d({r["image_id"]: r["caption"] for r in records}, {e.image_id: e.references for e in ex}, "python")
    assert result["cider"] == pytest.approx(again["cider"]) and result["examples"] == 3
    noise, noise_records = run_captioning(lm, ex, PromptConfig(), gen, batch_size=3, tokenizer="python",
                                          images="noise", progress=False)
    assert noise["images"] == "noise" and len(noise_records) == 3
    vqa = load_vqav2(coco / "q.json", coco / "a.json", coco, image_pattern="img{image_id}.png")
    vres, vrecs = run_vqa(lm, vqa, PromptConfig(), GenerationConfig(max_new_tokens=3), batch_size=2, progress=False)
    accs = [vqa_accuracy(r["answer"], e.answers) for r, e in zip(vrecs, vqa)]
    assert vres["accuracy"] == pytest.approx(100 * np.mean(accs))
    assert set(vres["per_answer_type"]) == {"number", "other"}
    out = tmp_path / "eval"
    write_results(out, "captioning_real", result, records)
    write_results(out, "vqa_real", vres, vrecs)
    saved = json.loads((out / "results.json").read_text())
    assert set(saved) == {"captioning_real", "vqa_real"}
    assert len((out / "vqa_real.jsonl").read_text().splitlines()) == 3
    text = table(saved)
    assert "CIDEr-D" in text and "VQA acc. %" in text
    png = contact_sheet([{"image": e.image, "caption": r["caption"], "reference": e.references[0]}
                         for e, r in zip(ex, records)], out / "sheet.png", columns=2, thumb=64, title="t")
    with Image.open(png) as im:
        assert im.width == 2 * 74 + 10 and im.height > 2 * 64


def test_caption_demo_writes_scores_captions_and_sheet(tiny_demo, lm, tmp_path, capsys):
    from pretrain.evaluate.demo_captions import caption_demo
    summary = caption_demo(lm, str(tiny_demo), tmp_path, n_images=6, show=2, max_new_tokens=4)
    saved = json.loads((tmp_path / "captions.json").read_text())
    assert saved["images"] == 6 and len(saved["captions"]) == 6
    assert summary["cider_real"] == saved["cider_real"] and "cider_noise" in summary
    refs = {c["key"]: [c["reference"]] for c in saved["captions"]}
    again = cider_d({c["key"]: c["generated"] for c in saved["captions"]}, refs, "python")
    assert saved["cider_real"] == pytest.approx(again["cider"])
    assert all(c["reference"].startswith("a ") for c in saved["captions"])  # demo captions
    with Image.open(tmp_path / "captions.png") as im:
        assert im.width > 0
    printed = capsys.readouterr().out
    assert printed.count("[captions]") == 3 and "CIDEr-D on 6 held-out images" in printed
