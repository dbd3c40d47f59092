"""The chat template: conversations -> document parts whose loss covers the assistant only.

    <s> <|user|> {user text, images where <image> stands} <|end|> <|assistant|> {answer} <|end|> ... </s>

`<|user|>`, `<|assistant|>` and `<|end|>` are control symbols of the tokenizer (reserved when it is
trained, pretrain/data/tokenizer.py): no raw text can produce them, so a conversation cannot forge
a role. User turns and the `<|assistant|>` marker are context only (their ids carry
`packing.NO_LOSS`); the answer and its closing `<|end|>` are the targets, so a tuned model learns
to stop, and so is the conversation's final `</s>` (after the last answer, as LLaVA trains its
separator). Images sit where `<image>` stands in a user turn, as `<boi> patches <eoi>` spans;
an image span takes the flag of the text before it, so its markers are never targets either. A
conversation is one document: packing never lets two conversations attend to each other (the
attention mask's document rule).

LLaVA conventions kept: roles `human`/`gpt` (also `user`/`assistant`), `<image>` possibly
followed or preceded by a newline, which is dropped with the placeholder.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from pretrain.data.packing import NO_LOSS

IMAGE_PLACEHOLDER = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass
class Turn:
    role: str  # "user" or "assistant"
    text: str


class BadConversation(ValueError):
    """A conversation the template refuses; `reason` is the skip-count key."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def turns_of(conversations: list, where: str = "") -> list[Turn]:
    """LLaVA's [{"from", "value"}] -> turns; checks roles and their order (user first, then
    alternating, at least one assistant turn)."""
    if not isinstance(conversations, list) or not conversations:
        raise BadConversation("bad_turns", f"{where}: `conversations` must be a non-empty list")
    turns = []
    for i, t in enumerate(conversations):
        if not isinstance(t, dict) or not isinstance(t.get("value"), str) or t.get("from") not in ROLES:
            raise BadConversation("bad_turns", f"{where}: turn {i} is not {{'from': human|gpt, 'value': str}}")
        turns.append(Turn(ROLES[t["from"]], t["value"]))
    if not any(t.role == "assistant" for t in turns):
        raise BadConversation("no_assistant_turn", f"{where}: no gpt turn")
    for i, t in enumerate(turns):
        if t.role != ("user" if i % 2 == 0 else "assistant"):
            raise BadConversation("bad_turns", f"{where}: turn {i} is {t.role}; turns must alternate, user first")
    if any(IMAGE_PLACEHOLDER in t.text for t in turns if t.role == "assistant"):
        raise BadConversation("image_placeholder_mismatch", f"{where}: <image> in an assistant turn")
    return turns


def count_placeholders(turns: list[Turn]) -> int:
    return sum(t.text.count(IMAGE_PLACEHOLDER) for t in turns)


def _context(ids: list[int]) -> list[int]:
    return [i | NO_LOSS for i in ids]


def _user_parts(text: str, encode, first_image: int) -> list:
    chunks = text.split(IMAGE_PLACEHOLDER)
    parts: list = []
    for k, chunk in enumerate(chunks):
        if k > 0:
            parts.append(first_image + k - 1)
        # LLaVA writes "<image>\nquestion" (or "question\n<image>"): the newline goes with it.
        if k > 0 and chunk.startswith("\n"):
            chunk = chunk[1:]
        if k < len(chunks) - 1 and chunk.endswith("\n"):
            chunk = chunk[:-1]
        if chunk:
            parts.append(_context(encode(chunk)))
    return parts


def conversation_parts(turns: list[Turn], tokenizer) -> list[Union[list[int], int]]:
    """Turns -> document parts: token-id lists (context ids flagged NO_LOSS) and image indices
    (0, 1, ... in order of their `<image>`). BOS/EOS are added by the loader."""
    user, assistant, end = tokenizer.chat_ids()
    parts: list = []
    n_images = 0
    for t in turns:
        if t.role == "user":
            parts.append(_context([user]))
            body = _user_parts(t.text, tokenizer.encode, n_images)
            n_images += t.text.count(IMAGE_PLACEHOLDER)
            parts.extend(body)
            parts.append(_context([end]))
        else:
            parts.append(_context([assistant]) + tokenizer.encode(t.text) + [end])
    return _merge_text(parts)


def prompt_parts(question: str, tokenizer, image: bool = True) -> list:
    """A one-turn prompt for generation: the user's question (after the image when `image`) and
    the `<|assistant|>` marker; decode until `<|end|>`. Ids are plain (no NO_LOSS flag)."""
    user, assistant, end = tokenizer.chat_ids()
    parts: list = [[user]] + ([0] if image else []) + [tokenizer.encode(question) + [end, assistant]]
    return _merge_text(parts)


def _merge_text(parts: list) -> list:
    out: list = []
    for p in parts:
        if isinstance(p, list) and out and isinstance(out[-1], list):
            out[-1] = out[-1] + p
        elif not isinstance(p, list) or p:
            out.append(p)
    return out
