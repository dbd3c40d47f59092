"""Pixels right at ingest (issue 16, point 4): EXIF orientation applied, every colour mode turned
into correct 8-bit RGB. Each mode is checked against a conversion written here in numpy float64
from the pixel values the test itself generated (not the same Pillow call), first on the
conversion alone (exact up to rounding), then end to end through `prepare_image` (JPEG out).
    .venv/bin/python -m pytest tests/test_ingest_pixels.py -q
"""
import io

import numpy as np
import pytest
from PIL import Image

from pretrain.data.images import ALPHA_BACKGROUND, to_rgb8
from pretrain.data.ingest.driver import IngestConfig, prepare_image

BG = np.asarray(ALPHA_BACKGROUND, dtype=np.float64)
H, W = 37, 53  # odd sizes


def _smooth(rng, channels, hi=255, dtype=np.uint8):
    """Random smooth fields (JPEG keeps them), one per channel, values in 0..hi."""
    y, x = np.mgrid[0:H, 0:W] / np.array([H, W]).reshape(2, 1, 1)
    out = []
    for _ in range(channels):
        a, b, c = rng.uniform(-1, 1, 3)
        f = 0.5 + 0.5 * np.sin(3 * a * x + 3 * b * y + 6 * c)
        out.append(np.rint(f * hi))
    return np.stack(out, axis=-1).astype(dtype)


def _composite(rgb, alpha):
    a = alpha.astype(np.float64)[..., None] / 255.0
    return rgb.astype(np.float64) * a + BG * (1 - a)


def _cases(rng):
    """(name, PIL image, expected float64 RGB [H, W, 3], lossless format to store it in)."""
    g16 = _smooth(rng, 1, 65535, np.uint16)[..., 0]
    rgba = _smooth(rng, 4)
    la = _smooth(rng, 2)
    cmyk = _smooth(rng, 4)
    y, x = np.mgrid[0:H, 0:W]
    blocks = (x // 16 + 2 * (y // 16) + int(rng.integers(0, 6))) % 6  # regions, not noise: JPEG keeps them
    pal_idx = blocks.astype(np.uint8)
    palette = rng.integers(0, 256, (6, 3)).astype(np.uint8)
    p = Image.fromarray(pal_idx, "P")
    p.putpalette(palette.ravel().tolist())
    pt = p.copy()
    pt.info["transparency"] = 2  # palette index 2 is transparent
    pt_expected = palette[pal_idx].astype(np.float64)
    pt_expected[pal_idx == 2] = BG
    grey = _smooth(rng, 1)[..., 0]
    bits = (blocks % 2).astype(bool)
    c, m, y, k = (cmyk[..., i].astype(np.float64) for i in range(4))
    return [
        ("16-bit grey", Image.fromarray(g16), np.repeat((g16 / 65535.0 * 255.0)[..., None], 3, -1), "PNG"),
        ("RGBA", Image.fromarray(rgba, "RGBA"), _composite(rgba[..., :3], rgba[..., 3]), "PNG"),
        ("LA", Image.fromarray(la, "LA"), _composite(np.repeat(la[..., :1], 3, -1), la[..., 1]), "PNG"),
        ("P", p, palette[pal_idx].astype(np.float64), "PNG"),
        ("P + transparency", pt, pt_expected, "PNG"),
        ("CMYK", Image.fromarray(cmyk, "CMYK"),
         np.stack([(255 - c) * (255 - k), (255 - m) * (255 - k), (255 - y) * (255 - k)], -1) / 255.0, "TIFF"),
        ("L", Image.fromarray(grey, "L"), np.repeat(grey[..., None].astype(np.float64), 3, -1), "PNG"),
        ("1", Image.fromarray(bits.astype(np.uint8) * 255, "L").convert("1", dither=Image.Dither.NONE),
         np.repeat(bits[..., None] * 255.0, 3, -1), "PNG"),
    ]


@pytest.mark.parametrize("idx", range(8))
def test_mode_converts_to_correct_rgb8(idx):
    rng = np.random.default_rng(100 + idx)
    name, im, expected, fmt = _cases(rng)[idx]
    # The conversion itself, on the decoded image: exact up to rounding.
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    with Image.open(io.BytesIO(buf.getvalue())) as decoded:
        got = np.asarray(to_rgb8(decoded), dtype=np.float64)
    assert got.shape == (H, W, 3)
    assert np.abs(got - expected).max() <= 1.0, name
    # End to end: the stored JPEG (no resize at this size) is close to the expected pixels.
    cfg = IngestConfig(output="", tokenizer="", source="t", image_size=256, min_image_size=8, jpeg_quality=95)
    jpg, _ = prepare_image(buf.getvalue(), cfg)
    with Image.open(io.BytesIO(jpg)) as out:
        assert out.mode == "RGB" and out.size == (W, H)
        err = np.abs(np.asarray(out, dtype=np.float64) - expected)
    assert err.mean() <= 6 and np.median(err) <= 4, (name, err.mean())


def _orient(upright, o):
    """The stored pixels of an image whose EXIF orientation is o (the inverse of what a viewer
    applies), written with numpy: 2 mirror, 3 rotate 180, 4 flip, 5 transpose, 6 rotated 90
    clockwise to view, 7 transverse, 8 rotated 90 counter-clockwise to view."""
    return {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
            5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, 1),
            7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
            8: lambda a: np.rot90(a, -1)}[o](upright)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_applied(orientation):
    # An upright image with a distinct quadrant pattern (wider than tall), stored as the camera would.
    up = np.zeros((64, 96, 3), np.uint8)
    up[:32, :48] = (250, 10, 10)
    up[:32, 48:] = (10, 250, 10)
    up[32:, :48] = (10, 10, 250)
    up[32:, 48:] = (240, 240, 20)
    stored = np.ascontiguousarray(_orient(up, orientation))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    for size in (256, 32):  # kept at its size / resized (draft + resize path)
        cfg = IngestConfig(output="", tokenizer="", source="t", image_size=size, min_image_size=8)
        jpg, _ = prepare_image(buf.getvalue(), cfg)
        with Image.open(io.BytesIO(jpg)) as out:
            got = np.asarray(out.convert("RGB"), dtype=np.float64)
        expected = np.asarray(Image.fromarray(up).resize((got.shape[1], got.shape[0]), Image.BILINEAR),
                              dtype=np.float64)
        assert got.shape[:2] == ((64, 96) if size == 256 else (32, 48)), got.shape
        assert np.abs(got - expected).mean() < 12, (orientation, size)
