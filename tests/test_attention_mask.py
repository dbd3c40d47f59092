"""The packed attention mask: dense mask vs a brute-force reading of the mask rule (docs/architecture.md), the
int32 ranges vs the mask (both directions), and the reference backend.

Run: `pytest tests/test_attention_mask.py -q` (CPU, a few seconds).
"""
import pytest
import torch

from kernels.attention import (AttentionRanges, attention_ranges, dense_mask, mask_from_ranges,
                               packed_attention, varlen_cu_seqlens)
from kernels.attention_layouts import edge_layouts, random_layout, source_layout


def brute_force_mask(doc_ids_BT, image_ids_BT):
    """The mask rule of docs/architecture.md, one (i, j) pair at a time in plain Python."""
    B, T = doc_ids_BT.shape
    doc, img = doc_ids_BT.tolist(), image_ids_BT.tolist()
    out = torch.zeros(B, T, T, dtype=torch.bool)
    for b in range(B):
        for i in range(T):
            for j in range(T):
                out[b, i, j] = doc[b][i] == doc[b][j] and (j <= i or (img[b][i] >= 0 and img[b][i] == img[b][j]))
    return out


def layouts():
    cases = []
    for T in (1, 2, 7, 33):
        cases += [(f"{name}_T{T}", d, i) for name, d, i in edge_layouts(T)]
    for seed in range(12):
        T = [5, 17, 40, 64][seed % 4]
        d, i = random_layout(3, T, seed=seed)
        cases.append((f"random_s{seed}_T{T}", d, i))
    return cases


LAYOUTS = layouts()


@pytest.mark.parametrize("name,doc_BT,img_BT", LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_dense_mask_matches_rule(name, doc_BT, img_BT):
    assert torch.equal(dense_mask(doc_BT, img_BT), brute_force_mask(doc_BT, img_BT))


@pytest.mark.parametrize("name,doc_BT,img_BT", LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_ranges_match_mask_both_directions(name, doc_BT, img_BT):
    r = attention_ranges(doc_BT, img_BT)
    assert isinstance(r, AttentionRanges)
    for t in r:
        assert t.dtype == torch.int32 and t.shape == doc_BT.shape
    mask_BTT = dense_mask(doc_BT, img_BT)
    assert torch.equal(mask_from_ranges(r, by="query"), mask_BTT)
    assert torch.equal(mask_from_ranges(r, by="key"), mask_BTT)
    # No row left without keys (and no key without queries): every token sees itself.
    assert bool((r.kv_end > r.kv_start).all()) and bool((r.q_end > r.q_start).all())
    assert bool(mask_BTT.any(-1).all())


def test_layout_generators_cover_the_corner_cases():
    # The random layouts must actually contain what the kernel tests rely on.
    seen = dict(image_row_start=False, image_row_end=False, one_token_doc=False, image_doc_start=False)
    for seed in range(40):
        d, i = random_layout(2, 48, seed=seed)
        r = attention_ranges(d, i)
        seen["image_row_start"] |= bool((i[:, 0] >= 0).any())
        seen["image_row_end"] |= bool((i[:, -1] >= 0).any())
        seen["one_token_doc"] |= bool(((r.q_end - r.kv_start) == 1).any())
        idx = torch.arange(48)
        seen["image_doc_start"] |= bool(((i >= 0) & (r.kv_start == idx) & (idx > 0)).any())
    assert all(seen.values()), seen


@pytest.mark.parametrize("source", ["caption", "interleaved", "text"])
def test_source_layouts_are_valid(source):
    d, i = source_layout(source, 2, 1024, seed=0)
    r = attention_ranges(d, i)
    assert torch.equal(mask_from_ranges(r), dense_mask(d, i))
    assert (source == "text") == bool((i < 0).all())


def test_reference_backend_matches_explicit_softmax_and_has_grads():
    torch.manual_seed(0)
    d, i = random_layout(2, 24, seed=3)
    q, k, v = (torch.randn(2, 2, 24, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = packed_attention(q, k, v, d, i, backend="reference", scale=0.3)
    s = (q @ k.transpose(-1, -2)) * 0.3
    s = s.masked_fill(~dense_mask(d, i)[:, None], float("-inf"))
    expect = torch.softmax(s, -1) @ v
    torch.testing.assert_close(out, expect)
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_auto_is_reference_on_cpu_and_errors_are_clear():
    d, i = random_layout(1, 8, seed=0)
    q = torch.randn(1, 1, 8, 16)
    torch.testing.assert_close(packed_attention(q, q, q, d, i), packed_attention(q, q, q, d, i, backend="reference"))
    with pytest.raises(ValueError, match="unknown attention backend"):
        packed_attention(q, q, q, d, i, backend="nope")
    with pytest.raises(RuntimeError, match="CUDA"):
        packed_attention(q, q, q, d, i, backend="flex")
    text_doc, text_img = d.clone(), torch.full_like(i, -1)
    with pytest.raises(RuntimeError, match="flash-attn|CUDA"):
        packed_attention(q, q, q, text_doc, text_img, backend="flash_attn")
    img = torch.full_like(i, -1)
    img[0, 2:5] = 0
    with pytest.raises(ValueError, match="text-only"):
        packed_attention(q, q, q, torch.zeros_like(d), img, backend="flash_attn")


def test_varlen_cu_seqlens():
    doc_BT = torch.tensor([[0, 0, 0, 1, 2, 2], [0, 1, 1, 1, 1, 2]], dtype=torch.int32)
    cu, max_len = varlen_cu_seqlens(doc_BT)
    assert cu.tolist() == [0, 3, 4, 6, 7, 11, 12] and max_len == 4 and cu.dtype == torch.int32
