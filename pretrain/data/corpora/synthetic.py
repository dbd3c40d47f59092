"""Synthetic web-like corpora for benchmarks and packing statistics (not for learning).

Lengths follow the published statistics of the paper's sources, so padding and throughput
measured on them transfer to the real data:
  * caption (DataComp/LAION-like): one image + a caption of lognormal length, median 12 tokens;
  * interleaved (OBELICS: 353M images / 141M docs, ~816 text tokens per doc): 1 + Poisson(1.5)
    images, text lognormal with mean ~800 tokens, cut into segments around the images;
  * text (DCLM-baseline: ~1.3k tokens per doc): lognormal, median ~650, heavy tail, cap 16k.
Images are photo-like JPEGs (a smooth random field plus sensor-like noise; 24-32 KB at 256 px,
~90 KB at 512x512, quality 90: the size of real web photos), drawn from a small pool so
generation is fast while every use still pays a full decode.

    from pretrain.data.corpora.synthetic import make_synthetic_corpus
    make_synthetic_corpus("/tmp/synth", n_caption=2000, n_interleaved=600, n_text=400)
"""
from __future__ import annotations

import io
import os
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pretrain.data.shards import ShardWriter, write_manifest
from pretrain.data.tokenizer import Tokenizer, train_tokenizer


def photo_like_jpeg(rng: np.random.Generator, width: int, height: int, quality: int = 90) -> bytes:
    """A smooth random colour field (upsampled 12x12) with Gaussian noise, as JPEG bytes."""
    small = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), dtype=np.float32)
    noisy = np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@dataclass
class SyntheticSpec:
    """Documents per source and the stored image size (shorter side, as ingest writes it)."""
    n_caption: int = 2000
    n_interleaved: int = 600
    n_text: int = 400
    image_px: int = 256
    image_pool: int = 48
    shard_samples: int = 500
    seed: int = 0


def synthetic_tokenizer(out: str) -> str:
    """OUT/tokenizer.model, trained once on placeholder words (only its special ids matter)."""
    path = os.path.join(out, "tokenizer.model")
    if not os.path.isfile(path):
        rng = random.Random(0)
        words = [f"w{i}" for i in range(200)]
        lines = [" ".join(rng.choice(words) for _ in range(20)) for _ in range(500)]
        train_tokenizer(iter(lines), os.path.join(out, "tokenizer"), vocab_size=400)
    return path


def make_synthetic_corpus(out: str, spec: SyntheticSpec | None = None, **kw) -> str:
    """Write a train split of the three sources under `out`; returns the manifest path."""
    spec = spec or SyntheticSpec(**kw)
    os.makedirs(out, exist_ok=True)
    tok = Tokenizer(synthetic_tokenizer(out))
    g = np.random.default_rng(spec.seed)
    lo, hi = 6, tok.vocab_size  # ordinary pieces (ids 0-5 are the specials)
    pool = [photo_like_jpeg(g, spec.image_px * (4 if i % 3 == 0 else 3) // 3 if i % 2 else spec.image_px,
                            spec.image_px) for i in range(spec.image_pool)]

    def text(n: int) -> list[int]:
        return g.integers(lo, hi, max(int(n), 1)).tolist()

    infos = []
    w = ShardWriter(out, "caption", "train", spec.shard_samples)
    for i in range(spec.n_caption):
        n = int(np.clip(g.lognormal(np.log(12), 0.6), 3, 77))
        w.write(f"c{i:08d}", [0, text(n)], [pool[int(g.integers(len(pool)))]])
    w.close()
    infos += w.infos
    w = ShardWriter(out, "interleaved", "train", spec.shard_samples)
    for i in range(spec.n_interleaved):
        n_img = 1 + int(g.poisson(1.5))
        total = int(np.clip(g.lognormal(np.log(550), 0.85), 20, 8000))
        cuts = np.sort(g.integers(0, total + 1, n_img))
        segs = np.diff(np.concatenate([[0], cuts, [total]]))
        parts: list = []
        for k in range(n_img):
            if segs[k]:
                parts.append(text(segs[k]))
            parts.append(k)
        if segs[-1]:
            parts.append(text(segs[-1]))
        w.write(f"i{i:08d}", parts, [pool[int(g.integers(len(pool)))] for _ in range(n_img)])
    w.close()
    infos += w.infos
    w = ShardWriter(out, "text", "train", spec.shard_samples)
    for i in range(spec.n_text):
        w.write(f"t{i:08d}", [text(np.clip(g.lognormal(np.log(650), 1.1), 10, 16000))], [])
    w.close()
    infos += w.infos
    return write_manifest(out, "tokenizer.model", ["caption", "interleaved", "text"], infos)
