"""Image decoding, augmentation and patchification (Pillow + torch, no torchvision).

Normalisation: pixels are scaled to [0, 1] and then mapped to [-1, 1] with mean 0.5 and std 0.5
per channel (the same for all channels). We do not use ImageNet statistics because the model
has no pretrained vision encoder that would expect them.

Colour modes (`to_rgb8`, used by ingest and by `to_pil`): every Pillow mode becomes 8-bit RGB by
its meaning, not by Pillow's default cast. 16-bit and 32-bit integer grey ("I;16*", "I") is
scaled from 0..65535 (Pillow's convert clips it at 255, turning most 16-bit photos white);
float grey ("F") is read as 0..1 when it lies there, else clipped to 0..255; anything with alpha
(RGBA, LA, La, RGBa, PA, P or L with a transparent colour) is composited over ALPHA_BACKGROUND
(white, as img2dataset does); CMYK uses the uncalibrated formula R = (255 - C)(255 - K) / 255
(embedded ICC profiles are not applied); other modes (P, L, 1, YCbCr, HSV, ...) use Pillow's
conversion. EXIF orientation is applied by `upright` (ingest stores upright pixels).

Patch layout: an image of side S is cut into (S/p)^2 patches in raster (row-major) order; each
patch is flattened channel-first, i.e. index c*p*p + y*p + x, giving C*p*p = 3*p*p values.
"""
from __future__ import annotations

import io
import math
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps

MEAN = 0.5
STD = 0.5
# Colour that transparent pixels are composited over (see the module docstring).
ALPHA_BACKGROUND = (255, 255, 255)
_EXIF_ORIENTATION = 0x0112

ImageLike = Union[Image.Image, bytes, torch.Tensor, np.ndarray]


def exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation tag (1..8; 1 = stored upright), read from the header only."""
    try:
        o = im.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a malformed EXIF block: treat the image as upright
        return 1
    return o if isinstance(o, int) and 1 <= o <= 8 else 1


def upright(im: Image.Image) -> Image.Image:
    """The image as it is meant to be seen: EXIF orientation applied (a no-op for orientation 1)."""
    if exif_orientation(im) == 1:
        return im
    return ImageOps.exif_transpose(im)


def to_rgb8(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB by its meaning (module docstring). RGB is returned as is."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I", "F") or mode.startswith("I;16"):
        a = np.asarray(im)
        if mode == "F":
            a = a.astype(np.float64)
            a = a * 255.0 if (a.size and a.min() >= 0.0 and a.max() <= 1.0) else a
            g = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        else:  # integer 0..65535 -> 0..255, rounded: (v * 255 + 32767) // 65535
            v = np.clip(a.astype(np.int64), 0, 65535)
            g = ((v * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(np.repeat(g[:, :, None], 3, axis=2), "RGB")
    if mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in im.info:
        if mode == "La":  # premultiplied: Pillow converts it to LA only
            im = im.convert("LA")
        rgba = np.asarray(im.convert("RGBA"), dtype=np.uint16)
        alpha = rgba[:, :, 3:4]
        bg = np.asarray(ALPHA_BACKGROUND, dtype=np.uint16)
        out = (rgba[:, :, :3] * alpha + bg * (255 - alpha) + 127) // 255
        return Image.fromarray(out.astype(np.uint8), "RGB")
    return im.convert("RGB")


def to_pil(img: ImageLike) -> Image.Image:
    """Accept a PIL image, encoded bytes, or a uint8 array/tensor [3,H,W] or [H,W,3]; return RGB."""
    if isinstance(img, Image.Image):
        return to_rgb8(img)
    if isinstance(img, (bytes, bytearray)):
        try:
            im = Image.open(io.BytesIO(img))
            im.load()
            return to_rgb8(im)
        except Exception as e:  # PIL raises several types for corrupt data
            raise ValueError(f"to_pil: cannot decode image bytes ({e})") from e
    if isinstance(img, torch.Tensor):
        img = img.detach().cpu().numpy()
    if isinstance(img, np.ndarray):
        if img.ndim == 3 and img.shape[0] == 3 and img.shape[-1] != 3:
            img = img.transpose(1, 2, 0)
        if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
            raise ValueError(f"to_pil: expected uint8 [3,H,W] or [H,W,3], got {img.dtype} {img.shape}")
        return Image.fromarray(np.ascontiguousarray(img), "RGB")
    raise ValueError(f"to_pil: unsupported image type {type(img).__name__}")


def random_resized_crop(img: Image.Image, size: int, scale: tuple[float, float],
                        rng: np.random.Generator, ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Image.Image:
    """Crop a random area fraction in `scale` with log-uniform aspect in `ratio`, resize to size².

    Same recipe as torchvision's RandomResizedCrop (10 tries, then a centre crop) with its default
    bilinear interpolation (antialiased when shrinking, as PIL always is); bilinear costs about
    half of bicubic per image, which matters at several hundred images per second per core.
    """
    W, H = img.size
    area = W * H
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= W and 0 < h <= H:
            x0 = int(rng.integers(0, W - w + 1))
            y0 = int(rng.integers(0, H - h + 1))
            return img.resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + w, y0 + h))
    return eval_resize(img, size)


def eval_resize(img: Image.Image, size: int) -> Image.Image:
    """Deterministic evaluation transform: centre square crop, resize to size²."""
    W, H = img.size
    s = min(W, H)
    x0, y0 = (W - s) // 2, (H - s) // 2
    return img.resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + s, y0 + s))


def patchify(img: Image.Image, patch_size: int) -> torch.Tensor:
    """RGB image of side S -> normalised patches [(S/p)^2, 3*p*p] (see module docstring).

    The reordering is done on uint8 (4x less memory traffic than on floats); the single float
    conversion then writes the output in its final layout. The math is numpy, not torch: torch
    would parallelise these small element-wise ops over its intra-op threads, which on a busy
    host (a training process, other ranks) costs milliseconds of spinning per image.
    """
    x_HWC = np.asarray(img, dtype=np.uint8)
    H, W, C = x_HWC.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"patchify: image {W}x{H} is not a multiple of patch_size {p}")
    # The reshape after the transpose copies, so the array handed to torch is writable.
    x = x_HWC.reshape(H // p, p, W // p, p, C).transpose(0, 2, 4, 1, 3).reshape((H // p) * (W // p), C * p * p)
    out = x.astype(np.float32)
    out *= np.float32(1.0 / (255.0 * STD))  # (x / 255 - MEAN) / STD
    out -= np.float32(MEAN / STD)
    return torch.from_numpy(out)


def unpatchify(patches_ND: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Inverse of patchify (for tests and visualisation): -> uint8 [H, W, 3]."""
    N, D = patches_ND.shape
    p = patch_size
    g = int(round(math.sqrt(N)))
    x = patches_ND.reshape(g, g, 3, p, p).permute(0, 3, 1, 4, 2).reshape(g * p, g * p, 3)
    return (x * STD + MEAN).mul(255).round().clamp(0, 255).to(torch.uint8)


def process_image(img: ImageLike, image_size: int, patch_size: int, *, augment: bool,
                  scale: tuple[float, float] = (0.4, 1.0), hflip_prob: float = 0.5,
                  rng: np.random.Generator | None = None) -> torch.Tensor:
    """Decode, (augment or centre-resize), patchify: -> float [n_patches, 3*p*p]."""
    pil = to_pil(img)
    if augment:
        if rng is None:
            raise ValueError("process_image: augment=True needs an rng")
        pil = random_resized_crop(pil, image_size, scale, rng)
        if rng.random() < hflip_prob:
            pil = pil.transpose(Image.FLIP_LEFT_RIGHT)
    else:
        pil = eval_resize(pil, image_size)
    return patchify(pil, patch_size)
