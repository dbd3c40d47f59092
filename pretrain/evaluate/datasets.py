"""Evaluation sets from their standard files: COCO-format captions and VQAv2 questions/annotations.

    captions:  {"images": [{"id", "file_name"}, ...], "annotations": [{"image_id", "caption"}, ...]}
               + a folder holding the images (COCO's captions_val2014.json, Karpathy-split files
               converted to it, nocaps, ...)
    VQAv2:     questions {"questions": [{"question_id", "image_id", "question"}]} and annotations
               {"annotations": [{"question_id", "answers": [{"answer", ...}] x 10, "answer_type",
               "question_type", "multiple_choice_answer"}]} + the image folder; the image file of
               an id is found by `image_pattern` (VQAv2 val: COCO_val2014_{image_id:012d}.jpg).

Examples are sorted by id and `limit` keeps the first ones, so a limited run is reproducible.
Images are read when generation needs them (`load_image`). A missing file, key or reference is
an error that names the file and the entry.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VQAV2_VAL_PATTERN = "COCO_val2014_{image_id:012d}.jpg"


@dataclass
class CaptionExample:
    image_id: Any
    image: Any  # a path, or anything pretrain.data.images.process_image takes (PIL, bytes, array)
    references: list[str]


@dataclass
class VQAExample:
    question_id: Any
    image_id: Any
    image: Any
    question: str
    answers: list[str]  # the human answers (10 in VQAv2)
    answer: str  # the most common human answer (VQAv2's multiple_choice_answer), used in shots
    answer_type: str = ""
    question_type: str = ""


def load_image(image: Any) -> Any:
    """A path becomes its bytes (decoded by the prompt layout); anything else passes through."""
    if isinstance(image, (str, Path)):
        try:
            return Path(image).read_bytes()
        except OSError as e:
            raise ValueError(f"cannot read image {image}: {e}") from e
    return image


def _read_json(path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read JSON ({e})") from e


def _check_images(examples: list, image_dir: Path, what: str) -> None:
    missing = [ex.image for ex in examples if not Path(ex.image).is_file()]
    if missing:
        raise ValueError(f"{what}: {len(missing)} of {len(examples)} images are not in {image_dir} "
                         f"(first: {missing[0]})")


def load_coco_captions(annotations: str | Path, image_dir: str | Path, limit: int | None = None) -> list[CaptionExample]:
    data = _read_json(annotations)
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{annotations}: no '{key}' list (expected COCO caption format)")
    refs: dict = {}
    for i, ann in enumerate(data["annotations"]):
        if "image_id" not in ann or not isinstance(ann.get("caption"), str):
            raise ValueError(f"{annotations}: annotations[{i}] needs 'image_id' and a 'caption' string")
        refs.setdefault(ann["image_id"], []).append(ann["caption"])
    image_dir = Path(image_dir)
    examples = []
    for i, img in enumerate(sorted(data["images"], key=lambda m: m.get("id", 0))):
        if "id" not in img or "file_name" not in img:
            raise ValueError(f"{annotations}: images[{i}] needs 'id' and 'file_name'")
        if img["id"] not in refs:
            continue  # an image without captions is not part of the caption set
        examples.append(CaptionExample(img["id"], image_dir / img["file_name"], refs[img["id"]]))
    if not examples:
        raise ValueError(f"{annotations}: no image has a caption")
    examples = examples[:limit] if limit else examples
    _check_images(examples, image_dir, str(annotations))
    return examples


def load_vqav2(questions: str | Path, annotations: str | Path, image_dir: str | Path,
               image_pattern: str = VQAV2_VAL_PATTERN, limit: int | None = None) -> list[VQAExample]:
    qs = _read_json(questions).get("questions")
    anns = _read_json(annotations).get("annotations")
    if not isinstance(qs, list):
        raise ValueError(f"{questions}: no 'questions' list (expected VQAv2 format)")
    if not isinstance(anns, list):
        raise ValueError(f"{annotations}: no 'annotations' list (expected VQAv2 format)")
    by_qid = {a.get("question_id"): a for a in anns}
    image_dir = Path(image_dir)
    examples = []
    for i, q in enumerate(sorted(qs, key=lambda q: q.get("question_id", 0))):
        for key in ("question_id", "image_id", "question"):
            if key not in q:
                raise ValueError(f"{questions}: questions[{i}] has no '{key}'")
        ann = by_qid.get(q["question_id"])
        if ann is None or not ann.get("answers"):
            raise ValueError(f"{annotations}: no answers for question_id {q['question_id']}")
        answers = [a["answer"] for a in ann["answers"]]
        common = ann.get("multiple_choice_answer") or max(set(answers), key=answers.count)
        examples.append(VQAExample(q["question_id"], q["image_id"],
                                   image_dir / image_pattern.format(image_id=q["image_id"]), q["question"],
                                   answers, common, ann.get("answer_type", ""), ann.get("question_type", "")))
    if not examples:
        raise ValueError(f"{questions}: no questions")
    examples = examples[:limit] if limit else examples
    _check_images(examples, image_dir, str(questions))
    return examples
