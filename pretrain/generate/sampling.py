"""Choosing the next token: greedy, temperature, top-k and top-p (nucleus) sampling; stop strings.

`next_tokens` is a pure function of the logits and a `torch.Generator`, so a seed reproduces a
sampled generation on the same device (draws are made for every row at every step, finished
rows included, so one row's length never shifts another row's random numbers).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class GenerationConfig:
    max_new_tokens: int = 32  # generated tokens per prompt at most (EOS included)
    temperature: float = 0.0  # 0: greedy (argmax); > 0: sample from softmax(logits / temperature)
    top_p: float = 1.0  # nucleus sampling: the smallest set of tokens with probability >= top_p
    top_k: int = 0  # sample among the k most likely tokens only (0: all)
    stop: list[str] = field(default_factory=list)  # stop strings; the text is cut before the first one
    stop_ids: list[int] = field(default_factory=list)  # token ids that end a row like EOS (chat: <|end|>)
    seed: int = 0  # seed of the sampling generator
    use_cache: bool = True  # False: rerun the whole sequence every step (the reference path)

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")


def next_tokens(logits_BV: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator) -> torch.Tensor:
    """int64 [B]: argmax at temperature 0, else a draw after temperature, top-k and top-p."""
    if cfg.temperature == 0:
        return logits_BV.argmax(dim=-1)
    logits_BV = logits_BV.float() / cfg.temperature
    if cfg.top_k and cfg.top_k < logits_BV.shape[-1]:
        kth_B1 = torch.topk(logits_BV, cfg.top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_BV, order_BV = torch.sort(logits_BV, dim=-1, descending=True)
        probs_BV = torch.softmax(sorted_BV, dim=-1)
        # Drop a token when the more likely tokens already reach top_p (the first always stays).
        drop_BV = probs_BV.cumsum(dim=-1) - probs_BV >= cfg.top_p
        logits_BV = logits_BV.scatter(-1, order_BV, sorted_BV.masked_fill(drop_BV, float("-inf")))
    probs_BV = torch.softmax(logits_BV, dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator)[:, 0]


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """(text before the earliest stop string, whether one occurred)."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
