"""Generation: the KV cache reproduces uncached decoding, the prefill honours the packed mask,
sampling is reproducible, stop strings cut the text.

The references are independent of the cache: the mask rule evaluated densely
(kernels.attention.dense_mask), decoding that reruns the whole sequence every step, and the
training forward over rows in which several finished sequences are packed together.

    python -m pytest tests/test_generate.py -q
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels.attention import dense_mask
from kernels.attention_layouts import random_layout
from pretrain.batch import PackedBatch
from pretrain.data.packing import Piece, SpecialIds, build_batch, span_length
from pretrain.data.tokenizer import Tokenizer
from pretrain.generate import GenerationConfig, InferenceModel, generate
from pretrain.generate.cache import KVCache, query_mask
from pretrain.generate.loop import banned_tokens, step_logits
from pretrain.generate.prompts import layout_prompts, prompt_items
from pretrain.generate.sampling import cut_at_stop, next_tokens
from pretrain.models import build_model
from pretrain.models.config import ModelConfig, MoEConfig, VisionConfig

IMAGE, PATCH = 16, 8  # 2x2 = 4 patches per image
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def tok(tiny_demo):
    return Tokenizer(str(tiny_demo / "tokenizer.model"))


def tiny_model(kind: str, vocab: int, seed: int = 0, device: str = "cpu") -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = ModelConfig(kind=kind, vocab_size=vocab, width=64, depth=2, head_dim=16, patch_size=PATCH,
                      image_size=IMAGE, attention_backend="reference", init_std=0.1,
                      vision=VisionConfig(width=32, depth=1, head_dim=16),
                      moe=MoEConfig(num_experts=4, top_k=1))
    return build_model(cfg).to(device).eval()


def random_image(rng: np.random.Generator, side: int = 24) -> np.ndarray:
    return rng.integers(0, 256, (side, side, 3), dtype=np.uint8)


def prompts_of(rng: np.random.Generator) -> list[list]:
    """Image+text prompts of different lengths: caption, question, two images, text only."""
    return [[random_image(rng)],
            [random_image(rng), "the red circle is at the"],
            [random_image(rng), "a", random_image(rng), "and then"],
            ["Anna found a small boat in"]]


def packed_reference_batch(seqs: list[list], rows: list[list[int]], T: int, tok) -> tuple[PackedBatch, list]:
    """A training batch laid out by the data pipeline's own packer, several sequences per row
    (`rows`: sequence indices per row); returns it and each sequence's (row, first slot)."""
    pieces = [Piece(0, items, span_length(items)) for items in seqs]
    batch = build_batch([[pieces[s] for s in members] for members in rows], [0] * len(rows), T,
                        SpecialIds.of(tok), 3 * PATCH ** 2)
    batch.validate()
    where = {}
    for b, members in enumerate(rows):
        t = 0
        for s in members:
            where[s] = (b, t)
            t += pieces[s].length
    return batch, [where[s] for s in range(len(seqs))]


@torch.no_grad()
def training_logits(model, batch: PackedBatch) -> torch.Tensor:
    """fp32 logits [B, T, V] of the training forward's path (packed_attention, no cache)."""
    return model.lm_head(model.final_norm(model.hidden_states(batch))).float()


def test_query_mask_is_the_dense_rule_on_its_rows():
    for seed in range(4):
        doc_BT, img_BT = random_layout(3, 37, seed=seed)
        full_BTT = dense_mask(doc_BT, img_BT)
        for first, n in [(0, 37), (0, 1), (5, 9), (36, 1), (20, 17)]:
            got = query_mask(doc_BT[:, first:first + n], img_BT[:, first:first + n], first,
                             doc_BT[:, :first + n], img_BT[:, :first + n])
            torch.testing.assert_close(got[:, 0], full_BTT[:, first:first + n, :first + n], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["early", "late", "moe"])
def test_prefill_and_decoding_match_the_training_forward_on_packed_rows(kind, tok):
    """Greedy generation with the cache, then the finished sequences packed three to a row and
    run through the training forward: every generated token is that forward's argmax at its
    position, and the cache's prefill logits equal the training logits at the prompts' ends."""
    model = tiny_model(kind, tok.vocab_size, seed=1)
    lm = InferenceModel(model, tok, IMAGE, PATCH)
    prompts = prompts_of(np.random.default_rng(0))
    n_new = 7
    out = generate(lm, prompts, GenerationConfig(max_new_tokens=n_new))
    assert all(len(g.token_ids) > 0 for g in out)
    prompt_seqs = [prompt_items(p, tok, IMAGE, PATCH) for p in prompts]
    seqs = [items + [np.asarray(g.token_ids, dtype=np.int64)] for items, g in zip(prompt_seqs, out)]
    batch, where = packed_reference_batch(seqs, [[2, 0, 3], [1]], 64, tok)
    logits_BTV = training_logits(model, batch)
    layout = layout_prompts(prompts, tok, IMAGE, PATCH)
    cache = KVCache.for_model(model, len(prompts), layout.tokens.shape[1], torch.float32, "cpu")
    with torch.no_grad():
        prefill_BV = step_logits(model, layout, cache)
    banned_V = banned_tokens(tok, logits_BTV.shape[-1], "cpu")
    for s, (b, start) in enumerate(where):
        n_prompt = layout.lengths[s]
        torch.testing.assert_close(prefill_BV[s], logits_BTV[b, start + n_prompt - 1], rtol=1e-4, atol=1e-5)
        gen = out[s].token_ids
        ref_TV = logits_BTV[b, start + n_prompt - 1:start + n_prompt - 1 + len(gen)]
        ref = ref_TV.masked_fill(banned_V, float("-inf")).argmax(-1)  # <boi> etc. are never generated
        assert ref.tolist() == gen, f"prompt {s}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["early", "late", "moe"])
def test_cached_generation_equals_uncached(kind, device, tok):
    model = tiny_model(kind, tok.vocab_size, seed=2, device=device)
    lm = InferenceModel(model, tok, IMAGE, PATCH)
    prompts = prompts_of(np.random.default_rng(1))
    for cfg in [GenerationConfig(max_new_tokens=12),
                GenerationConfig(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=3)]:
        cached = generate(lm, prompts, cfg)
        cfg.use_cache = False
        uncached = generate(lm, prompts, cfg)
        assert [g.token_ids for g in cached] == [g.token_ids for g in uncached]
        assert [g.finish_reason for g in cached] == [g.finish_reason for g in uncached]
    # Batching (left padding) changes nothing: each prompt alone gives the same tokens.
    greedy = generate(lm, prompts, GenerationConfig(max_new_tokens=12))
    for p, g in zip(prompts, greedy):
        assert generate(lm, [p], GenerationConfig(max_new_tokens=12))[0].token_ids == g.token_ids


def test_sampling_is_reproducible_with_a_seed(tok):
    lm = InferenceModel(tiny_model("early", tok.vocab_size, seed=4), tok, IMAGE, PATCH)
    prompts = prompts_of(np.random.default_rng(2))
    cfg = lambda seed: GenerationConfig(max_new_tokens=10, temperature=1.5, seed=seed)  # noqa: E731
    a, b, c = (generate(lm, prompts, cfg(s)) for s in (7, 7, 8))
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]
    special = {tok.bos_id, tok.pad_id, tok.boi_id, tok.eoi_id, tok.eos_id}
    assert not special & {i for g in a + c for i in g.token_ids}


def test_top_p_and_top_k_keep_only_the_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits_BV = probs.log().expand(4000, 4).contiguous()
    g = torch.Generator().manual_seed(0)
    # Sorted: 0.5, 0.3, 0.15, 0.05; mass before 0.15 is 0.8 >= top_p, so {1, 3} remain.
    drawn = next_tokens(logits_BV, GenerationConfig(temperature=1.0, top_p=0.8), g)
    counts = torch.bincount(drawn, minlength=4).double() / len(drawn)
    assert counts[0] == 0 and counts[2] == 0
    assert abs(counts[1] - 0.5 / 0.8) < 0.03
    drawn = next_tokens(logits_BV, GenerationConfig(temperature=1.0, top_k=1), g)
    assert set(drawn.tolist()) == {1}
    drawn = next_tokens(logits_BV, GenerationConfig(temperature=1.0), g)
    counts = torch.bincount(drawn, minlength=4).double() / len(drawn)
    assert torch.allclose(counts, probs.double(), atol=0.03)
    assert next_tokens(logits_BV[:1], GenerationConfig(), g).item() == 1


def test_stop_strings_cut_the_text(tok):
    assert cut_at_stop("a red circle. a blue", [".", "blue"]) == ("a red circle", True)
    assert cut_at_stop("no stop here", ["."]) == ("no stop here", False)
    lm = InferenceModel(tiny_model("early", tok.vocab_size, seed=5), tok, IMAGE, PATCH)
    prompts = prompts_of(np.random.default_rng(3))
    free = generate(lm, prompts, GenerationConfig(max_new_tokens=12))
    text = free[1].text
    assert len(text) > 4, text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    stopped = generate(lm, prompts, GenerationConfig(max_new_tokens=12, stop=[stop]))
    assert stopped[1].finish_reason == "stop"
    assert stopped[1].text == text[:text.find(stop)]
    for f, s in zip(free, stopped):  # a stop string only ever shortens a generation
        assert f.token_ids[:len(s.token_ids)] == s.token_ids


def test_stop_ids_end_a_row_like_eos(tok):
    """GenerationConfig.stop_ids (the chat template's <|end|>): the row ends at the first such id,
    which is left out of the ids and the text, and the text is the decoded ids before it."""
    lm = InferenceModel(tiny_model("early", tok.vocab_size, seed=5), tok, IMAGE, PATCH)
    prompts = prompts_of(np.random.default_rng(3))
    free = generate(lm, prompts, GenerationConfig(max_new_tokens=12))
    ids = free[1].token_ids
    assert len(ids) > 3, ids
    k = len(ids) // 2
    stop_id = ids[k]
    stopped = generate(lm, prompts, GenerationConfig(max_new_tokens=12, stop_ids=[stop_id]))
    first = ids.index(stop_id)
    assert stopped[1].finish_reason == "stop" and stopped[1].token_ids == ids[:first]
    assert stopped[1].text == tok.decode(ids[:first])
    for f, s in zip(free, stopped):  # a stop id only ever shortens a generation
        assert f.token_ids[:len(s.token_ids)] == s.token_ids


def test_late_fusion_encoder_runs_once_in_prefill(tok):
    model = tiny_model("late", tok.vocab_size, seed=6)
    calls = []
    model.image_embedder.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    prompts = prompts_of(np.random.default_rng(4))
    out = generate(InferenceModel(model, tok, IMAGE, PATCH), prompts, GenerationConfig(max_new_tokens=6))
    n_images = sum(not isinstance(p, str) for prompt in prompts for p in prompt)
    assert max(len(g.token_ids) for g in out) > 1
    assert calls == [n_images * (IMAGE // PATCH) ** 2]  # one encoder call, over every image's patches


def test_bad_prompts_and_settings_are_refused(tok):
    lm = InferenceModel(tiny_model("early", tok.vocab_size), tok, IMAGE, PATCH)
    with pytest.raises(ValueError, match="prompt part 1: to_pil: cannot decode image bytes"):
        generate(lm, [["a", b"not an image"]])
    with pytest.raises(ValueError, match="no prompts"):
        generate(lm, [])
    for bad in (dict(top_p=0.0), dict(temperature=-1.0), dict(max_new_tokens=0), dict(stop=[""])):
        with pytest.raises(ValueError):
            generate(lm, [["a"]], GenerationConfig(**bad))
    cache = KVCache.for_model(lm.model, 1, 2, torch.float32, "cpu")
    with pytest.raises(ValueError, match="3 slots needed, the cache holds 2"):
        cache.begin(torch.zeros(1, 3, dtype=torch.int32), torch.full((1, 3), -1, dtype=torch.int32))
