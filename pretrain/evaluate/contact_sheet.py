"""A contact sheet: a grid of images, each with its generated caption and its reference, as PNG.

Small images (the demo's are 48 px) are enlarged with nearest-neighbour so pixels stay visible.
"""
from __future__ import annotations

import io
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from pretrain.data.images import to_pil


def _as_pil(image) -> Image.Image:
    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            return im.convert("RGB")
    if isinstance(image, (bytes, bytearray)):
        return to_pil(bytes(image))
    return to_pil(image) if not isinstance(image, Image.Image) else image.convert("RGB")


def contact_sheet(items: list[dict], path: str | Path, columns: int = 4, thumb: int = 160,
                  title: str = "") -> Path:
    """items: {"image": path/PIL/bytes/array, "caption": str, "reference": str}; writes the PNG."""
    if not items:
        raise ValueError("contact_sheet: no items")
    font = ImageFont.load_default()
    wrap = max(12, thumb // 6)
    line_h = 12
    text_lines = [[(line, (0, 100, 0)) for line in textwrap.wrap(f"gen: {it['caption']}", wrap)[:3]]
                  + [(line, (70, 70, 70)) for line in textwrap.wrap(f"ref: {it['reference']}", wrap)[:3]]
                  for it in items]
    cell_h = thumb + 8 + line_h * max(len(t) for t in text_lines)
    rows = (len(items) + columns - 1) // columns
    top = 24 if title else 0
    sheet = Image.new("RGB", (columns * (thumb + 10) + 10, top + rows * (cell_h + 10) + 10), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((10, 6), title, fill="black", font=font)
    for k, (it, lines) in enumerate(zip(items, text_lines)):
        x = 10 + (k % columns) * (thumb + 10)
        y = top + 10 + (k // columns) * (cell_h + 10)
        im = _as_pil(it["image"])
        scale = thumb / max(im.size)
        resample = Image.NEAREST if scale >= 2 else Image.BILINEAR
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), resample)
        sheet.paste(im, (x, y))
        for j, (line, colour) in enumerate(lines):
            draw.text((x, y + thumb + 4 + j * line_h), line, fill=colour, font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    return path
