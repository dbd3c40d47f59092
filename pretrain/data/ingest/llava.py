"""LLaVA-format instruction data -> one document per conversation (the chat template applied).

Input as LLaVA publishes it (`llava_v1_5_mix665k.json`): a JSON array (or JSONL, one record per
line) of `{"id", "image": "coco/train2017/xxx.jpg" (optional; a list for several images),
"conversations": [{"from": "human"|"gpt", "value": "<image>\\nWhat is ..."}, ...]}`, with the
images in a folder tree under `--image-root` (default: the JSON file's folder). Samples without
an image and multi-turn conversations are read as they are.

Skipped and counted (the ingest driver's table): `bad_json`, `bad_turns` (roles missing, unknown
or not alternating user-first), `no_assistant_turn`, `image_placeholder_mismatch` (the number of
`<image>` differs from the number of images, or one stands in an assistant turn),
`missing_image_file`, `image_path_outside_root` (a path that leaves --image-root), `too_long`
(more than `--max-doc-tokens` tokens with every image counted as `--image-tokens`: a conversation
is never split, unlike long text documents), and the driver's own image checks. The template (pretrain/data/chat_template.py) marks user turns context-only,
so the loss covers the assistant's answers.

    python tools/prepare_data.py llava --input llava_v1_5_mix665k.json --image-root llava_images \\
        --output data/sft --tokenizer data/web/tokenizer.model
"""
from __future__ import annotations

import functools
import json
import os
from typing import Iterator, Union

from pretrain.data.ingest.driver import BadImage, IngestConfig, RawDoc, Skip
from pretrain.data.ingest.image_refs import ImageRefs
from pretrain.data.ingest.io import input_stem, iter_records
from pretrain.data.tokenizer import Tokenizer
from pretrain.data.chat_template import BadConversation, conversation_parts, count_placeholders, turns_of


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str) -> Tokenizer:
    return Tokenizer(path)


def _records(path: str) -> Iterator[Union[tuple[str, dict], Skip]]:
    """A JSON array file (LLaVA's release) or JSONL/parquet (iter_records)."""
    if not path.endswith(".json"):
        yield from iter_records(path)
        return
    name = os.path.basename(path)
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        yield Skip("bad_json", name, f"not a JSON array: {e}")
        return
    if not isinstance(data, list):
        yield Skip("bad_json", name, "top level is not a list of samples")
        return
    for i, rec in enumerate(data):
        if isinstance(rec, dict):
            yield f"{name}:[{i}]", rec
        else:
            yield Skip("bad_json", f"{name}:[{i}]", "sample is not an object")


def read_llava(path: str, cfg: IngestConfig) -> Iterator[Union[RawDoc, Skip]]:
    tok = _tokenizer(cfg.tokenizer)
    tok.chat_ids()  # fails here, once, with the fix, if the tokenizer has no chat markers
    stem = input_stem(path)
    refs = ImageRefs(path, cfg.image_root)  # paths confined under --image-root (or the JSON's folder)
    for n, item in enumerate(_records(path)):
        if isinstance(item, Skip):
            yield item
            continue
        where, rec = item
        try:
            turns = turns_of(rec.get("conversations"), where)
        except BadConversation as e:
            yield Skip(e.reason, where, e.detail)
            continue
        image = rec.get("image")
        rels = [] if image is None else image if isinstance(image, list) else [image]
        if count_placeholders(turns) != len(rels):
            yield Skip("image_placeholder_mismatch", where,
                       f"{count_placeholders(turns)} <image> for {len(rels)} image(s)")
            continue
        parts = conversation_parts(turns, tok)
        n_tokens = sum(len(p) for p in parts if isinstance(p, list)) + 2 + len(rels) * cfg.image_tokens
        if n_tokens > cfg.max_doc_tokens:  # never split a conversation: skip it
            yield Skip("too_long", where, f"{n_tokens} tokens > max_doc_tokens {cfg.max_doc_tokens}")
            continue
        key = f"{stem}_{n:08d}_{rec.get('id', '')}"
        yield RawDoc(key=key, parts=parts, images=[_image(refs, r) for r in rels], where=where)


def _image(refs: ImageRefs, rel) -> Union[bytes, BadImage]:
    data, reason = refs.read_local(rel) if isinstance(rel, str) and rel else (None, "missing_image")
    return data if data is not None else BadImage(reason, f"image {rel!r}")
