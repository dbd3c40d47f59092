"""The demo's instruction data: questions about the demo's coloured shapes, in LLaVA's format.

    python tools/make_sft_demo_data.py --out data/demo_sft     # what `make demo-sft` runs first

Writes, under OUT:
  * `train.json`: LLaVA-format conversations (`{"id", "image", "conversations"}`), each about one
    new image: 1-3 of "What colour is the shape?", "What shape is it?", "Where is it?" in random
    order (multi-turn; the first user turn holds `<image>`), plus a few text-only conversations
    (no image) so the reader's no-image path is exercised;
  * `val_questions.json` / `val_annotations.json`: held-out images and questions in VQAv2's
    format (10 identical human answers each, so soft accuracy is exact-match accuracy), images
    named by image id under `images/val/`;
  * `images/{train,val}/*.jpg` at the demo corpus's stored size.
The images are drawn by the demo corpus's generator with a seed disjoint from the pretraining
corpus's, so the held-out questions are about images the model has never seen.
"""
from __future__ import annotations

import json
import os
import random

from pretrain.data.corpora.demo import draw_shape, jpeg_bytes, random_spec

QUESTIONS = {"colour": "What colour is the shape?", "shape": "What shape is it?", "position": "Where is it?"}
TEXT_ONLY = [("Say the word {w}.", "{w}."), ("Repeat after me: {w}.", "{w}.")]
WORDS = ["circle", "square", "red", "blue", "hello", "shape", "top", "green"]


def _answer(spec, kind: str) -> str:
    return {"colour": spec.colour, "shape": spec.shape, "position": spec.position}[kind]


def make_demo_sft_data(out: str, n_train: int = 1200, n_val: int = 150, n_text: int = 60,
                       seed: int = 1234) -> dict:
    """Write the demo's SFT data under `out` (idempotent: kept when train.json exists)."""
    paths = {k: os.path.join(out, f) for k, f in
             [("train", "train.json"), ("questions", "val_questions.json"), ("annotations", "val_annotations.json"),
              ("val_images", os.path.join("images", "val"))]}
    if os.path.isfile(paths["train"]):
        return paths
    rng = random.Random(seed)
    for split in ("train", "val"):
        os.makedirs(os.path.join(out, "images", split), exist_ok=True)
    train = []
    for i in range(n_train):
        spec = random_spec(rng)
        rel = f"images/train/{i:06d}.jpg"
        with open(os.path.join(out, rel), "wb") as f:
            f.write(jpeg_bytes(draw_shape(spec, rng)))
        kinds = rng.sample(list(QUESTIONS), rng.randint(1, 3))
        conv = []
        for j, k in enumerate(kinds):
            conv.append({"from": "human", "value": ("<image>\n" if j == 0 else "") + QUESTIONS[k]})
            conv.append({"from": "gpt", "value": _answer(spec, k) + "."})
        train.append({"id": f"demo-{i:06d}", "image": rel, "conversations": conv})
    for i in range(n_text):
        q, a = rng.choice(TEXT_ONLY)
        w = rng.choice(WORDS)
        train.append({"id": f"demo-text-{i:04d}",
                      "conversations": [{"from": "human", "value": q.format(w=w)},
                                        {"from": "gpt", "value": a.format(w=w)}]})
    rng.shuffle(train)
    questions, annotations = [], []
    for i in range(n_val):
        spec = random_spec(rng)
        with open(os.path.join(out, "images", "val", f"{i:06d}.jpg"), "wb") as f:
            f.write(jpeg_bytes(draw_shape(spec, rng)))
        for k, q in QUESTIONS.items():
            qid = i * 10 + list(QUESTIONS).index(k)
            questions.append({"image_id": i, "question": q, "question_id": qid, "question_type": k})
            ans = _answer(spec, k)
            annotations.append({"image_id": i, "question_id": qid, "question_type": k, "answer_type": k,
                                "multiple_choice_answer": ans,
                                "answers": [{"answer": ans, "answer_id": a + 1, "answer_confidence": "yes"}
                                            for a in range(10)]})
    with open(paths["questions"], "w") as f:
        json.dump({"questions": questions}, f)
    with open(paths["annotations"], "w") as f:
        json.dump({"annotations": annotations}, f)
    with open(paths["train"] + ".tmp", "w") as f:
        json.dump(train, f)
    os.replace(paths["train"] + ".tmp", paths["train"])  # last: marks the data complete
    return paths
