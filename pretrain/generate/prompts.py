"""Prompts of text and images laid out as left-padded rows, the input of generation.

A prompt is a list of parts, as a training document's (pretrain/data/packing.py): a str (encoded
with the tokenizer), a list of token ids, or an image (PIL image, encoded bytes, uint8 array or
tensor, or float patches [n_patches, 3*p*p]). It becomes  BOS, parts...  with each image spanning
<boi>, patches..., <eoi>, exactly as in training, but without the closing EOS: generation
continues the document. To caption an image the prompt is `[image]` (a caption document is
`BOS <image> caption EOS`); to ask about it, `[image, "Question: ... Answer:"]`.

Rows are left-padded to the longest prompt so every row's next token lands in the same slot.
Each padding slot is its own document (docs/architecture.md, the batch contract), so no prompt
token ever attends padding, and positions restart at 0 where the prompt starts: a row generates
what it would generate alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pretrain.batch import IGNORE_INDEX, PackedBatch
from pretrain.data.images import process_image

PROMPT_DOC = 0  # document id of the prompt in its row; padding slots take 1, 2, ...


@dataclass
class PromptLayout:
    """The model inputs of a batch of prompts (fields as in `PackedBatch`), plus their lengths."""
    tokens: torch.Tensor  # int64 [B, T]
    patches: torch.Tensor  # float [P, C*p*p], images in row-major order of appearance
    is_patch: torch.Tensor  # bool [B, T]
    doc_ids: torch.Tensor  # int32 [B, T]
    image_ids: torch.Tensor  # int32 [B, T]
    position_ids: torch.Tensor  # int32 [B, T]
    lengths: list[int]  # prompt length of each row (without padding)

    def to_batch(self) -> PackedBatch:
        B, T = self.tokens.shape
        return PackedBatch(self.tokens, self.patches, self.is_patch, self.doc_ids, self.image_ids,
                           self.position_ids, torch.full((B, T), IGNORE_INDEX, dtype=torch.int64,
                                                         device=self.tokens.device),
                           torch.zeros((B, T), dtype=torch.int8, device=self.tokens.device))

    def next_step(self, tokens_B: torch.Tensor, generated: int) -> "PromptLayout":
        """One new text token per row (the `generated`-th, from 0), continuing each prompt."""
        B = tokens_B.shape[0]
        dev = tokens_B.device
        pos_B1 = torch.tensor(self.lengths, dtype=torch.int32, device=dev)[:, None] + generated
        return PromptLayout(tokens_B[:, None].long(), self.patches.new_zeros((0, self.patches.shape[1])),
                            torch.zeros((B, 1), dtype=torch.bool, device=dev),
                            torch.full((B, 1), PROMPT_DOC, dtype=torch.int32, device=dev),
                            torch.full((B, 1), -1, dtype=torch.int32, device=dev), pos_B1, self.lengths)

    def extended(self, step: "PromptLayout") -> "PromptLayout":
        """This layout with `step`'s tokens appended (the uncached, full-sequence input)."""
        cat = lambda a, b: torch.cat([a, b], dim=1)  # noqa: E731
        return PromptLayout(cat(self.tokens, step.tokens), self.patches, cat(self.is_patch, step.is_patch),
                            cat(self.doc_ids, step.doc_ids), cat(self.image_ids, step.image_ids),
                            cat(self.position_ids, step.position_ids), self.lengths)

    def to(self, device) -> "PromptLayout":
        return PromptLayout(*(getattr(self, f).to(device) for f in
                              ("tokens", "patches", "is_patch", "doc_ids", "image_ids", "position_ids")),
                            self.lengths)


def _is_patches(part) -> bool:
    return isinstance(part, torch.Tensor) and part.is_floating_point()


def prompt_items(parts: list, tokenizer, image_size: int, patch_size: int) -> list:
    """Parts -> items: int64 arrays of token ids (BOS first) and float patch tensors."""
    items: list = [np.array([tokenizer.bos_id], dtype=np.int64)]
    for k, part in enumerate(parts):
        if isinstance(part, str):
            items.append(np.asarray(tokenizer.encode(part), dtype=np.int64))
        elif isinstance(part, (list, tuple)):
            items.append(np.asarray(part, dtype=np.int64))
        elif _is_patches(part):
            items.append(part.float())
        else:
            try:
                items.append(process_image(part, image_size, patch_size, augment=False))
            except ValueError as e:
                raise ValueError(f"prompt part {k}: {e}") from e
    return items


def layout_prompts(prompts: list[list], tokenizer, image_size: int, patch_size: int) -> PromptLayout:
    """Left-padded rows of `prompts` (each a list of parts), on the CPU."""
    if not prompts:
        raise ValueError("layout_prompts: no prompts")
    rows = [prompt_items(p, tokenizer, image_size, patch_size) for p in prompts]
    lengths = [sum(len(it) if isinstance(it, np.ndarray) else it.shape[0] + 2 for it in r) for r in rows]
    B, T = len(rows), max(lengths)
    tokens = np.full((B, T), tokenizer.pad_id, dtype=np.int64)
    is_patch = np.zeros((B, T), dtype=np.bool_)
    image_ids = np.full((B, T), -1, dtype=np.int32)
    position_ids = np.zeros((B, T), dtype=np.int32)
    doc_ids = np.zeros((B, T), dtype=np.int32)
    patches = []
    for b, (items, n) in enumerate(zip(rows, lengths)):
        pad = T - n
        doc_ids[b, :pad] = np.arange(1, pad + 1)  # each padding slot its own document
        doc_ids[b, pad:] = PROMPT_DOC
        position_ids[b, pad:] = np.arange(n)
        t, n_img = pad, 0
        for it in items:
            if isinstance(it, np.ndarray):
                tokens[b, t:t + len(it)] = it
                t += len(it)
                continue
            n_p = it.shape[0]
            tokens[b, t], tokens[b, t + n_p + 1] = tokenizer.boi_id, tokenizer.eoi_id
            is_patch[b, t + 1:t + 1 + n_p] = True
            image_ids[b, t + 1:t + 1 + n_p] = n_img
            patches.append(it)
            n_img += 1
            t += n_p + 2
    patch_dim = 3 * patch_size ** 2
    patches_PC = torch.cat(patches) if patches else torch.zeros((0, patch_dim))
    if patches_PC.shape[1] != patch_dim:
        raise ValueError(f"layout_prompts: patches have {patches_PC.shape[1]} values, the model "
                         f"expects 3*{patch_size}^2 = {patch_dim}")
    t_ = torch.from_numpy
    return PromptLayout(t_(tokens), patches_PC, t_(is_patch), t_(doc_ids), t_(image_ids),
                        t_(position_ids), lengths)
