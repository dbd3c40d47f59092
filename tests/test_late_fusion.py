"""Late fusion: the ViT encoder's attention pattern, forward/backward through the whole model,
the encoder's learning-rate multiplier, and its FLOPs `6 (N_v D_v + N D)`.

    .venv/bin/python -m pytest tests/test_late_fusion.py -q
"""
from __future__ import annotations

import math

import pytest
import torch

from pretrain.accounting import count_model_params, paper_flops, param_counts
from pretrain.batch import IGNORE_INDEX, PackedBatch
from pretrain.models import build_model
from pretrain.models.config import ModelConfig, VisionConfig
from pretrain.models.late_fusion import LateFusionDecoder, lr_multipliers, vision_parameters
from pretrain.models.vision import VisionEncoder
from pretrain.optim import param_groups


def tiny_cfg(kind: str = "late", **kw) -> ModelConfig:
    """16x16 images of 4x4 patches (16 patches of 48 values), decoder width 32, ViT width 24."""
    base = dict(kind=kind, vocab_size=64, width=32, depth=2, head_dim=16, patch_size=4, image_size=16,
                attention_backend="reference",
                vision=VisionConfig(width=24, depth=2, head_dim=8, lr_mult=0.01))
    base.update(kw)
    return ModelConfig(**base)


def packed_batch(rows: list[list[list]], T: int, patch_dim: int, n_p: int, vocab: int = 64,
                 seed: int = 0) -> PackedBatch:
    """A `PackedBatch` built by the contract's rules (docs/architecture.md) from a layout.

    rows: per row, a list of documents; a document is a list of segments, an int `n` for `n` text
    tokens or the string "img" for one image span (`<boi>`, `n_p` patches, `<eoi>`). Positions left
    at the end of a row are padding, each its own document."""
    g = torch.Generator().manual_seed(seed)
    B = len(rows)
    tokens = torch.randint(3, vocab, (B, T), generator=g)
    is_patch = torch.zeros(B, T, dtype=torch.bool)
    doc_ids = torch.zeros(B, T, dtype=torch.int32)
    image_ids = torch.full((B, T), -1, dtype=torch.int32)
    position_ids = torch.zeros(B, T, dtype=torch.int32)
    for b, docs in enumerate(rows):
        t, n_img = 0, 0
        for d, doc in enumerate(docs):
            start = t
            for seg in doc:
                if seg == "img":
                    t += 1  # <boi>
                    is_patch[b, t:t + n_p] = True
                    image_ids[b, t:t + n_p] = n_img
                    n_img += 1
                    t += n_p + 1  # patches, <eoi>
                else:
                    t += seg
            doc_ids[b, start:t] = d
            position_ids[b, start:t] = torch.arange(t - start, dtype=torch.int32)
        assert t <= T, f"row {b} holds {t} tokens > T={T}"
        doc_ids[b, t:] = torch.arange(len(docs), len(docs) + T - t, dtype=torch.int32)  # padding
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.int64)
    same_doc = doc_ids[:, 1:] == doc_ids[:, :-1]
    next_is_text = ~is_patch[:, 1:]
    labels[:, :-1] = torch.where(same_doc & next_is_text, tokens[:, 1:], IGNORE_INDEX)
    patches = torch.randn(int(is_patch.sum()), patch_dim, generator=g)
    batch = PackedBatch(tokens=tokens, patches=patches, is_patch=is_patch, doc_ids=doc_ids,
                        image_ids=image_ids, position_ids=position_ids, labels=labels,
                        source_ids=torch.zeros(B, T, dtype=torch.int8))
    batch.validate()
    return batch


LAYOUT = [[[3, "img", 5], [2, "img", 1, "img", 2]],  # row 0: two documents, three images
          [[4], ["img", 6]]]                          # row 1: text-only doc, then a caption
SEQ = 96


def test_forward_backward_and_all_params_get_gradients():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = build_model(cfg)
    assert isinstance(model, LateFusionDecoder) and isinstance(model.image_embedder, VisionEncoder)
    batch = packed_batch(LAYOUT, SEQ, cfg.patch_dim, cfg.patches_per_image)
    out = model(batch)
    assert math.isfinite(out.loss.item())
    assert abs(out.ce_loss.item() - math.log(cfg.vocab_size)) < 1.0  # near uniform at init
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name != "embed.weight":  # rows of unused token ids stay zero; everything else learns
            assert p.grad.abs().sum() > 0, f"{name} got no gradient"


def test_encoder_is_bidirectional_within_an_image_and_images_are_isolated():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    enc = VisionEncoder(cfg).eval()
    n_p = cfg.patches_per_image
    patches = torch.randn(3 * n_p, cfg.patch_dim, requires_grad=True)
    out_PD = enc(patches)
    # Gradient of the FIRST patch's output of image 1: every patch of image 1 (also later ones:
    # bidirectional) influences it; no patch of images 0 and 2 does.
    out_PD[n_p].sum().backward()
    grad_norm_P = patches.grad.norm(dim=1)
    assert (grad_norm_P[n_p:2 * n_p] > 0).all()
    assert torch.equal(grad_norm_P[:n_p], torch.zeros(n_p))
    assert torch.equal(grad_norm_P[2 * n_p:], torch.zeros(n_p))
    # Perturbing the LAST patch of image 0 changes all of image 0's outputs and nothing else.
    with torch.no_grad():
        bumped = patches.detach().clone()
        bumped[n_p - 1] += 1.0
        delta_P = (enc(bumped) - out_PD.detach()).abs().amax(dim=1)
    assert (delta_P[:n_p] > 0).all()
    assert torch.equal(delta_P[n_p:], torch.zeros(2 * n_p))


def test_encoder_output_follows_each_image_not_its_batch_position():
    """An image's embeddings do not depend on which other images share the batch."""
    torch.manual_seed(0)
    cfg = tiny_cfg()
    enc = VisionEncoder(cfg).eval()
    n_p = cfg.patches_per_image
    a, b = torch.randn(n_p, cfg.patch_dim), torch.randn(n_p, cfg.patch_dim)
    with torch.no_grad():
        ab, ba = enc(torch.cat([a, b])), enc(torch.cat([b, a]))
    torch.testing.assert_close(ab[:n_p], ba[n_p:])
    torch.testing.assert_close(ab[n_p:], ba[:n_p])


def test_wrong_image_size_is_an_error():
    cfg = tiny_cfg()
    enc = VisionEncoder(cfg)
    with pytest.raises(ValueError, match="whole number of images"):
        enc(torch.randn(cfg.patches_per_image + 1, cfg.patch_dim))
    with pytest.raises(ValueError, match="image_size"):
        tiny_cfg(image_size=18).validate()


def test_encoder_learning_rate_multiplier_reaches_the_optimizer_groups():
    cfg = tiny_cfg()
    model = build_model(cfg)
    mults = lr_multipliers(model)
    vit = {n for n, _ in vision_parameters(model)}
    for name, m in mults.items():
        expected = 0.01 if name in vit and not name.startswith("image_embedder.proj.") else 1.0
        assert m == expected, name
    groups = param_groups(model, lr=1e-3, weight_decay=1e-4)
    by_id = {id(p): g for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert by_id[id(p)]["lr"] == pytest.approx(1e-3 * mults[name]), name


def test_encoder_init_scales_residual_outputs_by_its_own_depth():
    torch.manual_seed(0)
    cfg = tiny_cfg(depth=2, vision=VisionConfig(width=64, depth=32, head_dim=16))
    enc = build_model(cfg).image_embedder
    fc1, fc2 = enc.blocks[0].fc1.weight, enc.blocks[0].fc2.weight
    assert fc1.std().item() == pytest.approx(cfg.init_std, rel=0.1)
    assert fc2.std().item() == pytest.approx(cfg.init_std / math.sqrt(2 * 32), rel=0.1)
    assert torch.equal(enc.blocks[0].fc1.bias, torch.zeros_like(enc.blocks[0].fc1.bias))


def test_flops_are_six_times_vision_and_decoder_params_times_tokens():
    cfg = tiny_cfg()
    model = build_model(cfg)
    batch = packed_batch(LAYOUT, SEQ, cfg.patch_dim, cfg.patches_per_image)
    n_v = sum(p.numel() for p in model.image_embedder.parameters())
    n = sum(p.numel() for p in model.parameters()) - n_v
    d, d_v = batch.tokens.numel(), int(batch.is_patch.sum())
    counts = count_model_params(model)
    assert (counts.vision_params, counts.decoder_params) == (n_v, n)
    assert counts == param_counts(cfg)
    assert paper_flops(counts, d, d_v) == 6 * (n_v * d_v + n * d)
    assert paper_flops(param_counts(cfg), d, d_v) == 6 * (n_v * d_v + n * d)
