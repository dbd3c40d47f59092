"""Start late fusion's ViT from a pretrained Hugging Face vision tower (the paper's Appendix B.7).

    model.vision.init_from=/path/to/clip-vit-base-patch16      (a local directory, never a hub id)

Reads a `transformers`-format directory (config.json and model.safetensors, sharded safetensors or
pytorch_model.bin) of a CLIP or SigLIP model (`CLIPModel`, `CLIPVisionModel`,
`CLIPVisionModelWithProjection`, `SiglipModel`, `SiglipVisionModel`; text towers and heads are
ignored and counted) and copies its vision tower into `VisionEncoder`. Nothing is downloaded.

The encoder then runs the checkpoint's own math, not an approximation:
- architecture: `model.vision.{width, depth, head_dim, ffn_hidden, activation, pre_norm,
  class_token, norm_eps}`, `model.patch_size` and `model.image_channels` must equal the
  checkpoint's; anything else is an error listing the overrides to set (`check_config`, run by
  config validation before launch). CLIP: quick_gelu (OpenAI) or gelu, pre-LN, class token;
  SigLIP: gelu_tanh, no pre-LN, no class token, LayerNorm eps 1e-6.
- pixels: our patches are normalised with mean 0.5, std 0.5 (pretrain/data/images.py); the
  checkpoint expects `(x - image_mean) / image_std` from its preprocessor_config.json (else the
  family's standard values, and we say so). Both are affine per channel, so the difference is
  folded exactly into the patch-embedding weight and a constant that joins the position table
  (likewise SigLIP's patch-embedding bias): no extra parameters, same function.
- `features()` (the encoder before its projection) equals `post_layernorm` of the tower's last
  hidden state at the patch positions (SigLIP's `last_hidden_state`; CLIP applies its
  post-LayerNorm to the pooled class token only, we apply it to every patch).
- resolution: a checkpoint trained on another grid (e.g. 224 px / 16 = 14x14) gets its patch
  position table interpolated bicubically to ours (`transformers`' `interpolate_pos_encoding`
  rule; the class token's row is kept) -- a change of function, reported as such. A different
  patch size is refused (the patch kernel cannot be mapped exactly).
- the projection into the decoder (`proj`) is not in the checkpoint: it keeps its fresh init.

Freeze the loaded tower with `model.vision.lr_mult=0` or train it slowly (e.g. 0.01).
Try it:  python -m pretrain.models.vision_hf /path/to/checkpoint   (prints the matching overrides)
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from pretrain.models.config import ModelConfig

# Processor defaults when a checkpoint ships no preprocessor_config.json.
FAMILY_PIXELS = {"clip": ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]),
                 "siglip": ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])}
HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                  "gelu_new": "gelu_tanh"}


@dataclass
class LoadReport:
    family: str  # clip | siglip
    loaded: int  # tensors copied into the encoder
    ignored: list[str] = field(default_factory=list)  # checkpoint tensors with no place in it
    notes: list[str] = field(default_factory=list)  # changes of function (interpolation) and assumptions

    def summary(self) -> str:
        s = f"{self.family} vision tower: {self.loaded} tensors loaded, {len(self.ignored)} ignored"
        return "; ".join([s, *self.notes])


def _hf_config(path: Path):
    if not (path / "config.json").is_file():
        raise ValueError(f"model.vision.init_from: {path} has no config.json (a transformers-format "
                         f"checkpoint directory is expected)")
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(str(path), local_files_only=True)
    kind = hf.model_type
    if kind in ("clip", "siglip"):
        hf = hf.vision_config
    elif kind not in ("clip_vision_model", "siglip_vision_model"):
        raise ValueError(f"model.vision.init_from: {path} holds a '{kind}' model; only CLIP and SigLIP "
                         f"vision towers can be loaded")
    return kind.split("_")[0], hf


def expected_overrides(path: str | Path) -> dict[str, object]:
    """The `model.*` values a checkpoint's vision tower needs, as dotted override keys."""
    family, hf = _hf_config(Path(path))
    act = HF_ACTIVATIONS.get(hf.hidden_act)
    if act is None:
        raise ValueError(f"model.vision.init_from: activation '{hf.hidden_act}' of {path} has no "
                         f"equivalent in the encoder ({sorted(HF_ACTIVATIONS)})")
    return {"model.patch_size": hf.patch_size, "model.image_channels": hf.num_channels,
            "model.vision.width": hf.hidden_size, "model.vision.depth": hf.num_hidden_layers,
            "model.vision.head_dim": hf.hidden_size // hf.num_attention_heads,
            "model.vision.ffn_hidden": hf.intermediate_size, "model.vision.activation": act,
            "model.vision.pre_norm": family == "clip", "model.vision.class_token": family == "clip",
            "model.vision.norm_eps": hf.layer_norm_eps}


def check_config(cfg: ModelConfig) -> None:
    """Raise ValueError listing every `model.*` field that differs from the checkpoint's."""
    want = expected_overrides(cfg.vision.init_from)
    have = {"model.patch_size": cfg.patch_size, "model.image_channels": cfg.image_channels,
            **{f"model.vision.{k.split('.')[-1]}": getattr(cfg.vision, k.split(".")[-1])
               for k in want if k.startswith("model.vision.")}}
    have["model.vision.ffn_hidden"] = cfg.vision.ffn_hidden or 4 * cfg.vision.width
    bad = [f"{k}={want[k]} (config: {have[k]})" for k in want
           if (abs(have[k] - want[k]) > 1e-12 * abs(want[k]) if isinstance(want[k], float) else have[k] != want[k])]
    if bad:
        raise ValueError(f"model.vision.init_from={cfg.vision.init_from}: the encoder differs from the "
                         f"checkpoint's vision tower; set " + ", ".join(bad))


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file
        out: dict[str, torch.Tensor] = {}
        for f in files:
            out.update(load_file(str(f)))
        return out
    bins = sorted(path.glob("pytorch_model*.bin"))
    if not bins:
        raise ValueError(f"model.vision.init_from: no *.safetensors or pytorch_model*.bin in {path}")
    out = {}
    for f in bins:
        out.update(torch.load(f, map_location="cpu", weights_only=True))
    return out


def _pixel_stats(path: Path, family: str, notes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    pre = path / "preprocessor_config.json"
    if pre.is_file():
        d = json.loads(pre.read_text())
        if "image_mean" in d and "image_std" in d:
            return torch.tensor(d["image_mean"], dtype=torch.float64), torch.tensor(d["image_std"], dtype=torch.float64)
    notes.append(f"no image_mean/image_std in {pre.name}: assumed the {family} standard values")
    mean, std = FAMILY_PIXELS[family]
    return torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)


def resize_position_table(table_NV: torch.Tensor, grid: int) -> torch.Tensor:
    """Bicubic resampling of a square [g*g, V] patch position table to [grid*grid, V]."""
    n, v = table_NV.shape
    g = int(round(n ** 0.5))
    if g * g != n:
        raise ValueError(f"model.vision.init_from: position table of {n} rows is not a square grid")
    x = table_NV.reshape(1, g, g, v).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(grid, grid), mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1).reshape(grid * grid, v)


@torch.no_grad()
def load_hf_vision(encoder, path: str | Path) -> LoadReport:
    """Copy a CLIP / SigLIP vision tower into `encoder` (a VisionEncoder built from a config that
    passes `check_config`); returns what was loaded, ignored and changed."""
    from pretrain.data.images import MEAN, STD

    path = Path(path)
    cfg = encoder.cfg
    check_config(cfg)
    family, hf = _hf_config(path)
    notes: list[str] = []
    sd = _state_dict(path)
    # A CLIPModel / SiglipModel (and older vision-model saves) prefix the tower with
    # "vision_model."; transformers 5 saves a bare vision model without it.
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in sd) else ""
    vision = {k[len(prefix):]: v.double() for k, v in sd.items() if k.startswith(prefix)}
    ignored = sorted(k for k in sd if not k.startswith(prefix))
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in vision:
            raise ValueError(f"model.vision.init_from: {path} lacks '{prefix}{key}'")
        used.add(key)
        return vision[key]

    # Stem: conv kernel [V, C, p, p] -> Linear over channel-first flattened patches, with the
    # pixel normalisation folded in: x_ckpt = a_c * x_ours + b_c per channel.
    mean, std = _pixel_stats(path, family, notes)
    a_C, b_C = STD / std, (MEAN - mean) / std
    w_VCpp = take("embeddings.patch_embedding.weight")
    const_V = (w_VCpp * b_C[None, :, None, None]).sum((1, 2, 3))
    if "embeddings.patch_embedding.bias" in vision:  # SigLIP
        const_V = const_V + take("embeddings.patch_embedding.bias")
    encoder.patch_embed.weight.copy_((w_VCpp * a_C[None, :, None, None]).reshape(w_VCpp.shape[0], -1))
    pos_NV = take("embeddings.position_embedding.weight")
    n_cls = int(cfg.vision.class_token)
    patch_pos_NV = pos_NV[n_cls:]
    grid = cfg.image_size // cfg.patch_size
    if patch_pos_NV.shape[0] != grid * grid:
        g_ckpt = int(round(patch_pos_NV.shape[0] ** 0.5))
        notes.append(f"position table interpolated (bicubic) from a {g_ckpt}x{g_ckpt} grid "
                     f"({hf.image_size} px) to {grid}x{grid} ({cfg.image_size} px): the tower is no "
                     f"longer exactly the checkpoint's function")
        patch_pos_NV = resize_position_table(patch_pos_NV, grid)
    patch_pos_NV = patch_pos_NV + const_V
    encoder.pos_embed.copy_(torch.cat([pos_NV[:n_cls], patch_pos_NV]) if n_cls else patch_pos_NV)
    if n_cls:
        encoder.class_embed.copy_(take("embeddings.class_embedding"))

    def copy_ln(ours, theirs: str) -> None:
        ours.weight.copy_(take(theirs + ".weight"))
        ours.bias.copy_(take(theirs + ".bias"))

    if cfg.vision.pre_norm:
        copy_ln(encoder.ln_pre, "pre_layrnorm")
    for i, block in enumerate(encoder.blocks):
        h = f"encoder.layers.{i}."
        copy_ln(block.ln1, h + "layer_norm1")
        copy_ln(block.ln2, h + "layer_norm2")
        qkv = [h + f"self_attn.{n}_proj" for n in "qkv"]
        block.attn.qkv.weight.copy_(torch.cat([take(k + ".weight") for k in qkv]))
        block.attn.qkv.bias.copy_(torch.cat([take(k + ".bias") for k in qkv]))
        for ours, theirs in ((block.attn.out, "self_attn.out_proj"), (block.fc1, "mlp.fc1"), (block.fc2, "mlp.fc2")):
            ours.weight.copy_(take(h + theirs + ".weight"))
            ours.bias.copy_(take(h + theirs + ".bias"))
    copy_ln(encoder.ln_post, "post_layernorm")
    ignored += sorted(prefix + k for k in vision if k not in used)  # e.g. SigLIP's pooling head
    return LoadReport(family, len(used), ignored, notes)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m pretrain.models.vision_hf CHECKPOINT_DIR")
    print(" ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                   for k, v in expected_overrides(sys.argv[1]).items()))
