"""One raw image (bytes as served or stored) -> the JPEG that goes into a training shard.

The policy, identical for every input format (the driver calls `prepare_image` per image):
  * the header is checked before anything is decoded: pixel count against decompression bombs
    (`max_pixels`), shorter side against icons and spacers (`min_image_size`);
  * EXIF orientation is applied, so training sees photos upright (sizes below are upright sizes);
  * JPEGs are decoded in the DCT domain at reduced scale (PIL `draft`: 1/2, 1/4 or 1/8, never
    below the target), the shorter side is resized to `image_size` (never upscaled), extreme
    panoramas are centre-cropped to `max_long_side`;
  * any colour mode becomes 8-bit RGB by its meaning (`pretrain.data.images.to_rgb8`: 16-bit grey
    scaled, alpha composited on white, CMYK converted, ...);
  * the result is re-encoded as JPEG, except an upright RGB JPEG already small enough, which is
    kept byte for byte after a full decode proves it is complete.
A bad image raises `BadImage(reason)`; the driver counts it under that reason.
"""
from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING

from PIL import Image, ImageFile, UnidentifiedImageError

from pretrain.data.images import exif_orientation, to_rgb8, upright

if TYPE_CHECKING:
    from pretrain.data.ingest.driver import IngestConfig

# A truncated image must fail loudly (and be skipped), never be silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class BadImage(Exception):
    """An image that cannot be used; .reason is the counter name."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _dct_scale(w: int, h: int, target: tuple[int, int]) -> int:
    """The largest JPEG decode reduction (8, 4, 2, 1) whose output, ceil(side / s), still covers
    the target. Asking Pillow's draft for the target itself loses a factor 2 whenever the target
    is rounded up (683 px -> 342 asks more than 683 / 2), and a full decode plus resize of a
    512-px-short-side image costs more than the decode itself."""
    for s in (8, 4, 2):
        if -(-w // s) >= target[0] and -(-h // s) >= target[1]:
            return s
    return 1


def prepare_image(data: bytes, cfg: "IngestConfig") -> tuple[bytes, bool]:
    """Raw image bytes -> (upright RGB JPEG bytes, shorter side <= cfg.image_size; re-encoded?).

    Raises BadImage("corrupt_image" | "too_many_pixels" | "too_small").
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage("too_many_pixels", str(e)) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise BadImage("corrupt_image", str(e)) from None
    with im:
        w, h = im.size
        if w * h > cfg.max_pixels:  # from the header only: nothing decoded yet
            raise BadImage("too_many_pixels", f"{w}x{h}")
        orientation = exif_orientation(im)
        swap = orientation in (5, 6, 7, 8)  # stored sideways: upright width is the stored height
        uw, uh = (h, w) if swap else (w, h)
        if min(uw, uh) < cfg.min_image_size:
            raise BadImage("too_small", f"{uw}x{uh}")
        scale = min(1.0, cfg.image_size / min(uw, uh))
        tw, th = max(1, round(uw * scale)), max(1, round(uh * scale))
        too_long = cfg.max_long_side and max(tw, th) > cfg.max_long_side
        try:
            if (im.format == "JPEG" and im.mode == "RGB" and scale == 1.0 and not too_long
                    and orientation == 1):
                im.load()  # proves the file is complete; the original bytes are kept
                return data, False
            if im.format == "JPEG":
                # Decode directly at 1/2, 1/4 or 1/8 scale in the DCT domain (much cheaper than a
                # full decode followed by a resize); the result is never smaller than the target.
                s = _dct_scale(w, h, (th, tw) if swap else (tw, th))
                if s > 1:
                    im.draft("RGB", (w // s, h // s))
            im.load()
            rgb = to_rgb8(upright(im))
            if rgb.size != (tw, th):
                rgb = rgb.resize((tw, th), Image.BICUBIC, reducing_gap=2.0)
            if too_long:
                L = cfg.max_long_side
                x0, y0 = (tw - min(tw, L)) // 2, (th - min(th, L)) // 2
                rgb = rgb.crop((x0, y0, x0 + min(tw, L), y0 + min(th, L)))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise BadImage("corrupt_image", str(e)) from None
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=cfg.jpeg_quality)
    return buf.getvalue(), True
