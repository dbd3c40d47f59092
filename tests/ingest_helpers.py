"""Inputs and read-back for the ingest tests: a tiny tokenizer, tars, encoded images, shards."""
from __future__ import annotations

import contextlib
import io
import json
import os
import random
import runpy
import subprocess
import sys
import tarfile

import numpy as np
from PIL import Image

from pretrain.data.shards import ShardReader, load_manifest
from pretrain.data.tokenizer import Tokenizer, train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "red green blue cat dog house tree river small big old new the a of on in at".split()


def make_tokenizer(folder) -> str:
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(400)]
    return train_tokenizer(iter(lines), os.path.join(str(folder), "tok"), vocab_size=300)


def sentence(rng: random.Random, n: int = 6) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def encoded(colour=(200, 30, 60), fmt: str = "JPEG", size=(48, 40), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path, members) -> None:
    with tarfile.open(path, "w") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def read_shards(root: str, source: str) -> dict:
    """{key: (doc parts with text decoded, [HxWx3 uint8 images])}; asserts each key once."""
    tok = Tokenizer(os.path.join(root, "tokenizer.model"))
    out = {}
    for info in load_manifest(root).shards:
        if info.source != source:
            continue
        r = ShardReader(os.path.join(root, info.path))
        for s in r:
            assert s.key not in out, f"{s.key} written twice"
            parts = [tok.decode(p) if isinstance(p, list) else p for p in s.doc["parts"]]
            imgs = []
            for data in s.images:
                with Image.open(io.BytesIO(data)) as im:
                    assert im.format == "JPEG" and im.mode == "RGB"
                    imgs.append(np.asarray(im))
            out[s.key] = (parts, imgs)
        r.close()
    return out


def prepare_data_here(*args) -> subprocess.CompletedProcess:
    """tools/prepare_data.py with these arguments (and --no-progress), run in this process as
    `python tools/prepare_data.py ...` would run it: exit status, stdout, stderr."""
    argv = [os.path.join(ROOT, "tools", "prepare_data.py"), *map(str, args), "--no-progress"]
    out, err, code = io.StringIO(), io.StringIO(), 0
    old_argv = sys.argv
    sys.argv = argv
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        if isinstance(e.code, str):
            err.write(e.code + "\n")
            code = 1
        else:
            code = e.code or 0
    finally:
        sys.argv = old_argv
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def summary_of(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout)
