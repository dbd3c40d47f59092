"""The demo corpus, generated from nothing: coloured shapes, their captions, and simple prose.

Three sources, like the paper's mixture:
  * caption:     one image of a coloured shape + "a red circle at the top left."
  * interleaved: 2-4 such images, each introduced by sentences about it, with filler text;
  * text:        templated English prose (no images).
Everything is a pure function of the seed. Build the demo data set (raw text, tokenizer,
shards, manifest) with `python tools/make_demo_data.py --out data/demo`.

Caveat for users of the demo: captions name the position, but the training augmentation
(horizontal flip, random crop) changes positions, so only colour and shape are reliably
learnable from pixels unless augmentation is off.
"""
from __future__ import annotations

import io
import os
import random
import time
from dataclasses import dataclass
from typing import Optional

from PIL import Image, ImageDraw

from pretrain.data.shards import ShardReader, ShardWriter, load_manifest, split_of, write_manifest
from pretrain.data.tokenizer import Tokenizer, train_tokenizer

COLOURS: list[str] = ["red", "green", "blue", "yellow", "purple", "orange", "white"]
RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 180, 40), "blue": (40, 70, 230), "yellow": (240, 220, 30),
    "purple": (150, 40, 190), "orange": (250, 140, 20), "white": (245, 245, 245)}
SHAPES: list[str] = ["circle", "square", "triangle", "diamond", "cross"]
POSITIONS: list[str] = ["top left", "top right", "bottom left", "bottom right", "center"]
SOURCES: list[str] = ["caption", "interleaved", "text"]

STORED_SIZE = 48  # stored JPEG side; the loader crops/resizes to DataConfig.image_size


@dataclass
class ShapeSpec:
    colour: str
    shape: str
    position: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} at the {self.position}."


def draw_shape(spec: ShapeSpec, rng: random.Random, size: int = STORED_SIZE) -> Image.Image:
    """Plain dark background with mild noise; one shape with size/position jitter."""
    base = rng.randint(20, 60)
    img = Image.new("RGB", (size, size), (base, base, base))
    # Mild per-pixel noise (cheap: a small random image upscaled).
    noise = Image.frombytes("L", (size // 4, size // 4),
                            bytes(rng.randint(0, 24) for _ in range((size // 4) ** 2)))
    img = Image.blend(img, Image.merge("RGB", [noise.resize((size, size))] * 3), 0.3)
    d = ImageDraw.Draw(img)
    r = size * rng.uniform(0.22, 0.29)  # half-extent: at 32 px and 8-px patches, shapes span 3x3 patches
    cx = {"left": size * 0.28, "right": size * 0.72}
    cy = {"top": size * 0.28, "bottom": size * 0.72}
    if spec.position == "center":
        x, y = size / 2, size / 2
    else:
        v, h = spec.position.split()
        x, y = cx[h], cy[v]
    x += rng.uniform(-0.05, 0.05) * size
    y += rng.uniform(-0.05, 0.05) * size
    c = RGB[spec.colour]
    c = tuple(max(0, min(255, v + rng.randint(-15, 15))) for v in c)
    if spec.shape == "circle":
        d.ellipse([x - r, y - r, x + r, y + r], fill=c)
    elif spec.shape == "square":
        d.rectangle([x - r, y - r, x + r, y + r], fill=c)
    elif spec.shape == "triangle":
        d.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=c)
    elif spec.shape == "diamond":
        d.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=c)
    elif spec.shape == "cross":
        w = r * 0.38
        d.rectangle([x - r, y - w, x + r, y + w], fill=c)
        d.rectangle([x - w, y - r, x + w, y + r], fill=c)
    else:
        raise ValueError(f"draw_shape: unknown shape {spec.shape!r}")
    return img


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def random_spec(rng: random.Random) -> ShapeSpec:
    return ShapeSpec(rng.choice(COLOURS), rng.choice(SHAPES), rng.choice(POSITIONS))


# -- text ------------------------------------------------------------------------------------
_NAMES = ["Anna", "Ben", "Clara", "David", "Ella", "Farid", "Grace", "Hugo", "Iris", "Jonas", "Kim", "Leo"]
_ANIMALS = ["cat", "dog", "fox", "horse", "bird", "rabbit", "goat", "duck"]
_PLACES = ["the garden", "the market", "the river", "the old house", "the school", "the forest",
           "the station", "the village", "the kitchen", "the library"]
_VERBS = ["walked to", "looked at", "ran past", "cleaned", "painted", "visited", "left", "found"]
_ADJS = ["small", "big", "quiet", "happy", "old", "new", "tired", "bright", "cold", "warm"]
_TIMES = ["In the morning", "At noon", "Later that day", "In the evening", "At night", "On Sunday"]
_THINGS = ["a book", "a basket of apples", "a letter", "a red ball", "a green hat", "a small boat",
           "a blue cup", "an old map", "a yellow kite", "a wooden box"]
_FILLER = ["The weather was calm.", "Nobody said a word.", "It had rained the day before.",
           "The wind moved the trees.", "Everything was quiet for a while.",
           "There were many people around.", "The light was soft and warm.",
           "Time passed slowly.", "It was a good day."]


def prose_sentence(rng: random.Random) -> str:
    t = rng.randrange(6)
    n, a, p, v = rng.choice(_NAMES), rng.choice(_ANIMALS), rng.choice(_PLACES), rng.choice(_VERBS)
    if t == 0:
        return f"{rng.choice(_TIMES)}, {n} {v} {p}."
    if t == 1:
        return f"The {rng.choice(_ADJS)} {a} slept near {p}."
    if t == 2:
        return f"{n} found {rng.choice(_THINGS)} in {p}."
    if t == 3:
        return f"{n} and {rng.choice(_NAMES)} {v} {p} with a {rng.choice(_ADJS)} {a}."
    if t == 4:
        return f"There were {rng.randint(2, 12)} {a}s in {p}."
    return rng.choice(_FILLER)


def text_document(rng: random.Random) -> str:
    return " ".join(prose_sentence(rng) for _ in range(rng.randint(3, 9)))


_INTROS = ["Here is a {c} {s}.", "The next picture shows a {c} {s}.", "Look at this {c} {s}.",
           "This image has a {c} {s} in it.", "Now we see a {c} {s}."]
_AFTERS = ["It is at the {p}.", "The {s} sits at the {p}.", "The {c} {s} is at the {p}.",
           "You can find it at the {p}."]


def interleaved_document(rng: random.Random) -> tuple[list, list[ShapeSpec]]:
    """parts: str sentences and int image indices; returns (parts, specs of the images)."""
    parts: list = []
    specs = []
    if rng.random() < 0.7:
        parts.append(prose_sentence(rng))
    for k in range(rng.randint(2, 4)):
        spec = random_spec(rng)
        specs.append(spec)
        fmt = dict(c=spec.colour, s=spec.shape, p=spec.position)
        parts.append(rng.choice(_INTROS).format(**fmt))
        parts.append(k)
        parts.append(rng.choice(_AFTERS).format(**fmt))
        if rng.random() < 0.4:
            parts.append(rng.choice(_FILLER))
    return parts, specs


# -- the whole data set ----------------------------------------------------------------------
@dataclass
class DemoSizes:
    """Documents generated per source (before the train/val split) and shard sizes."""
    caption: int = 6400
    interleaved: int = 1800
    text: int = 1800
    val_fraction: float = 0.1
    shard_samples: Optional[dict[str, int]] = None  # samples per shard, per source (None: defaults)

    def __post_init__(self):
        if self.shard_samples is None:
            self.shard_samples = {"caption": 1500, "interleaved": 400, "text": 400}


def _raw_documents(seed: int, sizes: DemoSizes):
    """Yield (source, key, parts with str/int, images as PIL, meta) for every demo document."""
    for source, n in [("caption", sizes.caption), ("interleaved", sizes.interleaved), ("text", sizes.text)]:
        rng = random.Random(f"{seed}-{source}")  # one stream per source: sizes change nothing else
        for i in range(n):
            key = f"{source}{i:07d}"
            if source == "caption":
                spec = random_spec(rng)
                yield source, key, [0, spec.caption], [draw_shape(spec, rng)], \
                    {"caption": spec.caption, "colour": spec.colour, "shape": spec.shape,
                     "position": spec.position}
            elif source == "interleaved":
                parts, specs = interleaved_document(rng)
                yield source, key, parts, [draw_shape(s, rng) for s in specs], None
            else:
                yield source, key, [text_document(rng)], [], None


def make_demo_data(out: str, seed: int = 0, sizes: Optional[DemoSizes] = None,
                   vocab_size: int = 512, verbose: bool = True) -> str:
    """Generate images, train the tokenizer, write shards + manifest under `out`. Returns the
    manifest path. Deterministic given (seed, sizes, vocab_size)."""
    sizes = sizes or DemoSizes()
    t0 = time.time()
    os.makedirs(out, exist_ok=True)
    docs = list(_raw_documents(seed, sizes))
    # Tokenizer trained on the text of all train documents (one text part per line).
    text_path = os.path.join(out, "tokenizer_train.txt")
    with open(text_path, "w") as f:
        for source, key, parts, _, _ in docs:
            if split_of(key, sizes.val_fraction) == "train":
                for p in parts:
                    if isinstance(p, str):
                        f.write(p.strip() + "\n")
    prefix = os.path.join(out, "tokenizer")
    train_tokenizer(text_path, prefix, vocab_size=vocab_size)
    tok = Tokenizer(prefix + ".model")
    writers = {(s, sp): ShardWriter(out, s, sp, sizes.shard_samples.get(s, 1000))
               for s in SOURCES for sp in ("train", "val")}
    for source, key, parts, images, meta in docs:
        enc = [p if isinstance(p, int) else tok.encode(p) for p in parts]
        writers[(source, split_of(key, sizes.val_fraction))].write(
            key, enc, [jpeg_bytes(im) for im in images], meta)
    infos = []
    for w in writers.values():
        w.close()
        infos.extend(w.infos)
    path = write_manifest(out, "tokenizer.model", SOURCES, infos)
    if verbose:
        for s in SOURCES:
            for sp in ("train", "val"):
                sel = [i for i in infos if i.source == s and i.split == sp]
                print(f"{s:12s} {sp:5s}: {len(sel)} shards, {sum(i.samples for i in sel)} docs, "
                      f"{sum(i.text_tokens for i in sel)} text tokens, {sum(i.images for i in sel)} images")
        print(f"tokenizer: {tok.vocab_size} pieces; wrote {path} in {time.time() - t0:.1f}s")
    return path


@dataclass
class ProbeExample:
    key: str
    image: Image.Image  # as stored (STORED_SIZE px); pack with pack_documents for the model
    caption: str
    colour: str
    shape: str
    position: str


def probe_examples(root: str, split: str = "val", n: int = 64) -> list[ProbeExample]:
    """The first n caption samples of `split` (canonical shard order) with their labels."""
    manifest = load_manifest(root)
    out: list[ProbeExample] = []
    for shard in manifest.select("caption", split):
        reader = ShardReader(manifest.abspath(shard))
        for key in reader.keys:
            if len(out) >= n:
                break
            raw = reader.read(key)
            meta = raw.doc.get("meta")
            if not meta:
                raise ValueError(f"probe_examples: {shard.path}:{key} has no meta (not demo data?)")
            with Image.open(io.BytesIO(raw.images[0])) as im:
                img = im.convert("RGB")
            out.append(ProbeExample(key, img, meta["caption"], meta["colour"], meta["shape"], meta["position"]))
        reader.close()
    return out
