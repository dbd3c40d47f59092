"""Late fusion, the paper's baseline: a ViT encoder over the patches, projected into the decoder.

    h = embed(tokens);  h[is_patch] = proj(ViT(patches))   then the same MultimodalDecoder

The encoder (pretrain/models/vision.py) is the decoder's `image_embedder`, so batches, masks and
losses are exactly early fusion's; only what turns pixels into decoder inputs differs. The ViT is
bidirectional within each image and images never see each other; inside the decoder the patch
positions follow the packed mask (docs/architecture.md) like early fusion's.

Learning rate: the ViT trains at `model.vision.lr_mult` times the peak learning rate (the
paper's Table 8: 0.01 works best from scratch); the projection into the decoder (the connector)
trains at the full rate. `build_late_fusion` tags every ViT parameter with `p.lr_mult`, which
`pretrain.optim.param_groups` reads; `lr_multipliers(model)` lists the multiplier of every
parameter by name and `vision_parameters(model)` the encoder's parameters, for anything else that
builds optimizer groups. `lr_mult=0` freezes the ViT (the paper's Table 7 setting for an
initialised encoder): `requires_grad=False`, so no gradient and no optimizer state. Weight decay:
the ViT's is `train.weight_decay * lr_mult` by default (`model.vision.decay_with_lr_mult`; the
paper is silent): it then decays by the same fraction per unit of update as the decoder, instead
of 1/lr_mult times faster. `model.vision.init_from` loads a Hugging Face CLIP / SigLIP vision tower
(pretrain/models/vision_hf.py).

Accounting: `N_v` = the encoder's parameters (projection included), `N` = everything else; the
paper's training FLOPs are `6 (N_v D_v + N D)` (pretrain/accounting.py).

Try it:  python -m pretrain.models.late_fusion   (a tiny model, one forward + backward)
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from pretrain.models.config import ModelConfig
from pretrain.models.decoder import MultimodalDecoder
from pretrain.models.layers import SwiGLU
from pretrain.models.vision import VisionEncoder


class LateFusionDecoder(MultimodalDecoder):
    """The shared decoder with a `VisionEncoder` as image embedder (which re-initialises itself
    with its own depth after the decoder's blanket initialisation)."""


def build_late_fusion(cfg: ModelConfig) -> LateFusionDecoder:
    encoder = VisionEncoder(cfg)
    # Tag the ViT's parameters with their learning-rate multiplier; optimizer groups read it. The
    # projection into the decoder is the connector, not the encoder: it trains at the decoder's
    # rate (with a frozen encoder, the paper's Table 7 setting, it is what still learns).
    # lr_mult=0 freezes the encoder: no gradient is computed for it and the optimizer holds no
    # state for it (pretrain/optim.py leaves frozen parameters out of its groups).
    v = cfg.vision
    for name, p in encoder.named_parameters():
        if not name.startswith("proj."):
            p.lr_mult = v.lr_mult
            p.wd_mult = v.lr_mult if v.decay_with_lr_mult else 1.0
            p.requires_grad_(v.lr_mult > 0)
    return LateFusionDecoder(cfg, encoder, lambda layer: SwiGLU(cfg.width, cfg.ffn_hidden_size))


def vision_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) of the vision encoder (projection included); empty for other families."""
    encoder = getattr(model, "image_embedder", None)
    if isinstance(encoder, VisionEncoder):
        yield from (("image_embedder." + n, p) for n, p in encoder.named_parameters())


def lr_multipliers(model: nn.Module) -> dict[str, float]:
    """Learning-rate multiplier of every parameter by name (1.0 unless tagged with `lr_mult`)."""
    return {n: float(getattr(p, "lr_mult", 1.0)) for n, p in model.named_parameters()}


if __name__ == "__main__":
    from pretrain.batch import PackedBatch

    cfg = ModelConfig(kind="late", vocab_size=64, width=32, depth=2, head_dim=16, patch_size=4,
                      image_size=8, attention_backend="reference")
    cfg.vision.width, cfg.vision.depth, cfg.vision.head_dim = 24, 2, 8
    model = build_late_fusion(cfg)
    T, n_p = 16, cfg.patches_per_image  # one row: BOS, <boi>, 4 patches, <eoi>, 9 text tokens
    is_patch = torch.zeros(1, T, dtype=torch.bool)
    is_patch[0, 2:2 + n_p] = True
    image_ids = torch.where(is_patch, 0, -1).int()
    tokens = torch.randint(0, 64, (1, T))
    labels = torch.cat([tokens[:, 1:], torch.full((1, 1), -100)], 1)
    labels[:, 1:1 + n_p] = -100  # no target where the next token is a patch
    batch = PackedBatch(tokens, torch.randn(n_p, cfg.patch_dim), is_patch, torch.zeros(1, T, dtype=torch.int32),
                        image_ids, torch.arange(T, dtype=torch.int32)[None], labels,
                        torch.zeros(1, T, dtype=torch.int8))
    batch.validate()
    out = model(batch)
    out.loss.backward()
    n_v = sum(p.numel() for _, p in vision_parameters(model))
    print(f"loss {out.loss.item():.3f}; {sum(p.numel() for p in model.parameters()):,} params, "
          f"{n_v:,} in the encoder (lr x{cfg.vision.lr_mult:g})")
