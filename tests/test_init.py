"""Initialisation: image embeddings start at the scale of text embeddings (layers.PatchProjection,
the late-fusion connector in vision.py), measured at init for every family on 14 px patches.

The expected RMS is computed independently from the pixels in float64: an N(0, s^2) weight
over `fan_in` inputs gives outputs of RMS `s * sqrt(sum x^2)` per patch.
Run with -s to see the table of measured RMS values."""
import math

import pytest
import torch

from pretrain.models import build_model
from pretrain.models.config import ModelConfig, VisionConfig

PATCH, IMAGE = 14, 56  # the presets' patch size; 16 patches per image keeps the test small


def _pixels(kind: str, n_images: int, g: torch.Generator) -> torch.Tensor:
    """Normalised patches in [-1, 1]: uniform noise, or smooth images (a gradient plus a disc)."""
    p_dim = 3 * PATCH * PATCH
    n = n_images * (IMAGE // PATCH) ** 2
    if kind == "noise":
        return torch.rand(n, p_dim, generator=g) * 2 - 1
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, IMAGE), torch.linspace(-1, 1, IMAGE), indexing="ij")
    imgs = []
    for _ in range(n_images):
        c = torch.rand(3, 1, 1, generator=g) * 2 - 1
        disc = ((xx - 0.2) ** 2 + yy ** 2 < 0.3).float()
        imgs.append((0.6 * c * xx + 0.4 * disc).clamp(-1, 1))
    x = torch.stack(imgs)  # [I, 3, S, S] -> row-major patches [I * N_p, 3 * p * p]
    x = x.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH)  # [I, 3, h, w, p, p]
    return x.permute(0, 2, 3, 1, 4, 5).reshape(n, p_dim)


def _rms(x: torch.Tensor) -> float:
    return float(x.detach().double().pow(2).mean().sqrt())


@pytest.mark.parametrize("kind", ["early", "moe", "late"])
@pytest.mark.parametrize("pixels", ["noise", "smooth"])
def test_image_embeddings_start_at_text_scale(kind, pixels):
    cfg = ModelConfig(kind=kind, vocab_size=128, width=256, depth=2, head_dim=64, patch_size=PATCH,
                      image_size=IMAGE, attention_backend="reference",
                      vision=VisionConfig(width=96, depth=2, head_dim=32))
    cfg.moe.num_experts = 2
    g = torch.Generator().manual_seed(hash((kind, pixels)) % 2**31)
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
    model = build_model(cfg)
    patches = _pixels(pixels, 3, g)
    with torch.no_grad():
        img = model.image_embedder(patches)
    text_rms, img_rms = _rms(model.embed.weight), _rms(img)
    if kind == "late":  # ln_post's output has unit RMS per element
        expected = cfg.init_std
    else:  # E[(w . x)^2] = (std^2 / fan_in) * |x|^2, averaged over patches
        expected = cfg.init_std * math.sqrt(float(patches.double().pow(2).sum(1).mean()) / cfg.patch_dim)
    print(f"{kind:5s} {pixels:6s} text RMS {text_rms:.4f}  image RMS {img_rms:.4f}  "
          f"(pixel RMS {_rms(patches):.3f}, expected {expected:.4f})")
    assert text_rms == pytest.approx(cfg.init_std, rel=0.03)
    assert img_rms == pytest.approx(expected, rel=0.1)
    assert img_rms <= 1.1 * text_rms  # never the 7-11x of the previous initialisation
    if kind != "late":
        assert float(model.image_embedder.bias.abs().max()) == 0.0
