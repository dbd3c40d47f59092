"""`generate`: batched decoding of text+image prompts, with a KV cache or by full recomputation.

    prefill:  the left-padded prompts in one forward under the packed mask -> cache, last logits
    decode:   one token per row per step; its keys/values join the cache
    use_cache=False reruns the whole sequence (prompt + tokens so far) through the training
    forward's attention every step: the reference the cached path must reproduce token for token.

Late fusion runs its vision encoder once, in prefill (decoding steps carry no patches). Tokens the
model cannot continue a text with (<s>, <pad>, <boi>, <eoi>, ids beyond the tokenizer) are never
generated; EOS ends a row, and so does a stop string (GenerationConfig.stop).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pretrain.generate.cache import KVCache
from pretrain.generate.loading import InferenceModel
from pretrain.generate.prompts import PromptLayout, layout_prompts
from pretrain.generate.sampling import GenerationConfig, cut_at_stop, next_tokens


@dataclass
class Generation:
    text: str  # decoded continuation, cut before a stop string
    token_ids: list[int]  # generated ids (EOS excluded; the tokens of a stop string included)
    finish_reason: str  # "eos", "stop" or "length"


def step_logits(model, layout: PromptLayout, cache: KVCache | None) -> torch.Tensor:
    """fp32 logits [B, V] at the last slot of every row."""
    if cache is not None:
        cache.begin(layout.doc_ids, layout.image_ids)
    h_BTD = model.hidden_states(layout.to_batch(), kv_cache=cache)
    if cache is not None:
        cache.commit()
    return model.lm_head(model.final_norm(h_BTD[:, -1])).float()


def banned_tokens(tokenizer, vocab_size: int, device) -> torch.Tensor:
    """bool [V]: ids generation never emits."""
    banned_V = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    banned_V[min(tokenizer.vocab_size, vocab_size):] = True
    for i in (tokenizer.bos_id, tokenizer.pad_id, tokenizer.boi_id, tokenizer.eoi_id):
        banned_V[i] = True
    return banned_V


@torch.no_grad()
def generate(lm: InferenceModel, prompts: list[list], cfg: GenerationConfig | None = None) -> list[Generation]:
    """Continue each prompt (a list of parts: str, token ids, images; see prompts.py)."""
    cfg = cfg or GenerationConfig()
    cfg.validate()
    model, tok = lm.model, lm.tokenizer
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    was_training = model.training
    model.eval()
    try:
        layout = layout_prompts(prompts, tok, lm.image_size, lm.patch_size).to(device)
        B, T0 = layout.tokens.shape
        cache = KVCache.for_model(model, B, T0 + cfg.max_new_tokens, dtype, device) if cfg.use_cache else None
        logits_BV = step_logits(model, layout, cache)
        banned_V = banned_tokens(tok, logits_BV.shape[-1], device)
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
        ids: list[list[int]] = [[] for _ in range(B)]
        texts, reasons = [""] * B, [""] * B
        full = layout
        for t in range(cfg.max_new_tokens):
            nxt_B = next_tokens(logits_BV.masked_fill(banned_V, float("-inf")), cfg, generator)
            for b, i in enumerate(nxt_B.tolist()):
                if reasons[b]:
                    continue
                if i == tok.eos_id or i in cfg.stop_ids:
                    reasons[b] = "eos" if i == tok.eos_id else "stop"
                    texts[b] = tok.decode(ids[b])  # a stop id ends the text like EOS (not part of it)
                    continue
                ids[b].append(i)
                if cfg.stop:
                    texts[b], stopped = cut_at_stop(tok.decode(ids[b]), cfg.stop)
                    reasons[b] = "stop" if stopped else ""
            if all(reasons) or t == cfg.max_new_tokens - 1:
                break
            step = layout.next_step(nxt_B, t)
            if cache is not None:
                logits_BV = step_logits(model, step, cache)
            else:
                full = full.extended(step)
                logits_BV = step_logits(model, full, None)
        return [Generation(texts[b] if reasons[b] == "stop" else tok.decode(ids[b]), ids[b],
                           reasons[b] or "length") for b in range(B)]
    finally:
        model.train(was_training)
