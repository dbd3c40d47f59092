"""Zero- and few-shot prompts for captioning and VQA.

A prompt is one document (pretrain/generate/prompts.py): the shots, each an image followed by
its filled shot template and the separator, then the query image followed by the query template.

    captioning, zero-shot (default):   <image>                 the model writes the caption, as
                                                               caption documents are trained
    captioning, 2 shots:               <img1> a dog on grass.\\n<img2> two cats.\\n<image>
    VQA:                               <image> Question: what is it? Answer:
    VQA, chat (instruction-tuned):     <|user|> <image> what is it? <|end|> <|assistant|>
                                       (the chat template of pretrain/data/chat_template.py;
                                       generation stops at <|end|>; shots are earlier turns)

Shots are other examples of the evaluated set (never the query), drawn with a seed per query.
With shots, generation also stops at the separator, which ends every shot's answer.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from pretrain.evaluate.datasets import CaptionExample, VQAExample, load_image


@dataclass
class PromptConfig:
    caption_prompt: str = ""  # text after the query image for captioning ("" = the image alone)
    caption_shot: str = "{caption}"  # a shot's text after its image ({caption}: its first reference)
    vqa_prompt: str = "Question: {question} Answer:"  # text after the query image for VQA
    vqa_shot: str = "Question: {question} Answer: {answer}"  # a VQA shot's text after its image
    shots: int = 0  # examples shown before the query (0 = zero-shot)
    separator: str = "\n"  # after each shot's text
    seed: int = 0  # picks the shots
    chat: bool = False  # VQA in the chat template, for instruction-tuned (SFT) models
    chat_ids: tuple = ()  # (<|user|>, <|assistant|>, <|end|>) ids, set from the model's tokenizer

    def stop_strings(self) -> list[str]:
        return [self.separator] if self.shots and self.separator.strip(" ") else []


def pick_shots(index: int, n_examples: int, cfg: PromptConfig) -> list[int]:
    """`cfg.shots` indices of other examples, the same for a given (seed, index)."""
    if cfg.shots >= n_examples:
        raise ValueError(f"{cfg.shots} shots need more than {n_examples} examples in the set")
    rng = random.Random(f"{cfg.seed}-{index}")
    return rng.sample([i for i in range(n_examples) if i != index], cfg.shots) if cfg.shots else []


def _text_part(text: str) -> list:
    return [text] if text else []


def caption_prompt(examples: list[CaptionExample], index: int, cfg: PromptConfig, query_image=None) -> list:
    parts: list = []
    for j in pick_shots(index, len(examples), cfg):
        shot = examples[j]
        parts += [load_image(shot.image), cfg.caption_shot.format(caption=shot.references[0]) + cfg.separator]
    image = load_image(examples[index].image) if query_image is None else query_image
    return parts + [image] + _text_part(cfg.caption_prompt)


def vqa_prompt(examples: list[VQAExample], index: int, cfg: PromptConfig, query_image=None) -> list:
    if cfg.chat:
        return _chat_vqa_prompt(examples, index, cfg, query_image)
    parts: list = []
    for j in pick_shots(index, len(examples), cfg):
        shot = examples[j]
        parts += [load_image(shot.image),
                  cfg.vqa_shot.format(question=shot.question, answer=shot.answer) + cfg.separator]
    ex = examples[index]
    image = load_image(ex.image) if query_image is None else query_image
    return parts + [image] + _text_part(cfg.vqa_prompt.format(question=ex.question))


def _chat_vqa_prompt(examples: list[VQAExample], index: int, cfg: PromptConfig, query_image=None) -> list:
    """The question as a user turn of the chat template, then the assistant's marker; shots are
    earlier turn pairs (user: image + question, assistant: answer)."""
    if len(cfg.chat_ids) != 3:
        raise ValueError("PromptConfig.chat needs chat_ids (Tokenizer.chat_ids())")
    user, assistant, end = cfg.chat_ids
    parts: list = []
    for j in pick_shots(index, len(examples), cfg):
        shot = examples[j]
        parts += [[user], load_image(shot.image), shot.question, [end, assistant], shot.answer, [end]]
    ex = examples[index]
    image = load_image(ex.image) if query_image is None else query_image
    return parts + [[user], image, ex.question, [end, assistant]]
