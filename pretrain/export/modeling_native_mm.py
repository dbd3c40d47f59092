"""Remote code of a Hugging Face export: Qwen3 / Qwen3-MoE plus our image path.

Shipped beside `config.json` by `tools/export.py --format hf`; loaded with
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`. Self-contained (torch and
transformers only). The decoder is stock Qwen3 / Qwen3-MoE; this adds `image_embedder` (early
fusion: one linear layer over flattened patches; late fusion: the CLIP-style ViT and its
projection, `config.native_mm["vision"]`) and a forward over packed multimodal rows:

    model(input_ids, patches=[P, C*p*p], is_patch=[B, T], doc_ids=[B, T], image_ids=[B, T])

Patch embeddings replace the token embeddings at `is_patch` positions (images as contiguous
spans `<boi>, patches..., <eoi>`); attention is causal, bidirectional inside each image
(`image_ids` >= 0 on its patches, -1 elsewhere) and never crosses documents (`doc_ids`); positions
restart at 0 in each document unless `position_ids` is given. Pixels are scaled to [-1, 1]
(mean/std 0.5) and each patch is flattened channel-last (`p*p*C`) in raster order. Without
`patches`/`is_patch` the call is plain Qwen3 (text, generation, caches). The multimodal call
scores whole packed rows (no KV cache: its mask covers the given tokens only); generation with
images is `pretrain`'s own (tools/generate.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen3ForCausalLM, Qwen3MoeForCausalLM


class _ViTBlock(nn.Module):
    def __init__(self, width: int, head_dim: int, hidden: int, eps: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(width, eps=eps)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(width, 3 * width)
        self.attn.out = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width, eps=eps)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.head_dim = head_dim

    def forward(self, x):  # [images, patches, width], bidirectional within each image
        n_img, n, w = x.shape
        q, k, v = self.attn.qkv(self.ln1(x)).view(n_img, n, 3, w // self.head_dim, self.head_dim).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n_img, n, w)
        x = x + self.attn.out(a)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class VisionEncoder(nn.Module):
    """Late fusion's encoder: patches [P, C*p*p] -> [P, hidden], images of a fixed patch count."""

    def __init__(self, mm: dict, hidden_size: int):
        super().__init__()
        v = mm["vision"]
        self.patches_per_image = (mm["image_size"] // mm["patch_size"]) ** 2
        self.patch_embed = nn.Linear(mm["patch_dim"], v["width"], bias=False)
        self.pos_embed = nn.Parameter(torch.zeros(self.patches_per_image, v["width"]))
        self.ln_pre = nn.LayerNorm(v["width"], eps=mm["norm_eps"])
        self.blocks = nn.ModuleList(_ViTBlock(v["width"], v["head_dim"], v["ffn_hidden"], mm["norm_eps"])
                                    for _ in range(v["depth"]))
        self.ln_post = nn.LayerNorm(v["width"], eps=mm["norm_eps"])
        self.proj = nn.Linear(v["width"], hidden_size)

    def forward(self, patches):
        n = self.patches_per_image
        if patches.shape[0] % n:
            raise ValueError(f"{patches.shape[0]} patches is not a whole number of {n}-patch images")
        x = self.ln_pre(self.patch_embed(patches.view(-1, n, patches.shape[1])) + self.pos_embed.to(patches.dtype))
        for block in self.blocks:
            x = block(x)
        return self.proj(self.ln_post(x)).reshape(patches.shape[0], -1)


def packed_attention_mask(doc_ids, image_ids, dtype):
    """Additive [B, 1, T, T] mask: same document and (causal or the same image)."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    same_img = (image_ids[:, :, None] == image_ids[:, None, :]) & (image_ids[:, :, None] >= 0)
    allowed = same_doc & (causal | same_img)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=doc_ids.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def document_positions(doc_ids):
    """Position of each token inside its document (documents contiguous in a row)."""
    T = doc_ids.shape[1]
    idx = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)
    start = torch.ones_like(doc_ids, dtype=torch.bool)
    start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first


class _Multimodal:
    """Adds the image path to a Qwen3 causal LM (mixed in before the transformers class)."""

    def _build_image_embedder(self, config):
        mm = config.native_mm
        if mm["kind"] == "late":
            self.image_embedder = VisionEncoder(mm, config.hidden_size)
        else:
            self.image_embedder = nn.Linear(mm["patch_dim"], config.hidden_size)

    def forward(self, input_ids=None, patches=None, is_patch=None, doc_ids=None, image_ids=None,
                position_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
        if is_patch is None and patches is None and doc_ids is None:
            return super().forward(input_ids=input_ids, position_ids=position_ids,
                                   attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs)
        B, T = input_ids.shape
        if is_patch is None:
            is_patch = torch.zeros_like(input_ids, dtype=torch.bool)
        if doc_ids is None:
            doc_ids = torch.zeros_like(input_ids)
        if image_ids is None:
            if is_patch.any():
                raise ValueError("image_ids is needed with is_patch (which patches form one image)")
            image_ids = torch.full_like(input_ids, -1)
        embeds = self.get_input_embeddings()(torch.where(is_patch, torch.zeros_like(input_ids), input_ids))
        if patches is not None and patches.shape[0]:
            img = self.image_embedder(patches.to(embeds.dtype))
            embeds = embeds.masked_scatter(is_patch[..., None], img.to(embeds.dtype))
        if attention_mask is None:
            attention_mask = packed_attention_mask(doc_ids, image_ids, embeds.dtype)
        if position_ids is None:
            position_ids = document_positions(doc_ids)
        return super().forward(inputs_embeds=embeds, attention_mask=attention_mask,
                               position_ids=position_ids.long(), **kwargs)


class NativeMMQwen3ForCausalLM(_Multimodal, Qwen3ForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        self._build_image_embedder(config)
        self.post_init()


class NativeMMQwen3MoeForCausalLM(_Multimodal, Qwen3MoeForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        self._build_image_embedder(config)
        self.post_init()
