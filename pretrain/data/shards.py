"""Training shards: webdataset tars of tokenized documents, and the manifest that lists them.

One sample = one document:
    KEY.json      {"source": "caption"|"interleaved"|"text"|..., "parts": [...], "meta": {...}?}
                  where a part is a list of int token ids (text, no BOS/EOS) or an int k = "image k"
    KEY.img{k}.jpg  JPEG bytes of image k
Keys contain no dots (webdataset splits the extension at the first dot). Shards live under
ROOT/{source}/{split}-{i:05d}.tar and ROOT/manifest.json reads:
    {"tokenizer": "tokenizer.model", "sources": [...],
     "shards": [{"path", "source", "split", "samples", "text_tokens", "images"}, ...]}
with paths relative to ROOT. Tars are written with fixed mtimes/owners so output is byte-stable.

The web-scale ingest tools (tools/prepare_*) reuse `ShardWriter`, `split_of` and `write_manifest`.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import asdict, dataclass, field
from typing import Optional


def split_position(key: str, salt: str = "") -> float:
    """The key's stable place in [0, 1): keys below the val fraction are held out."""
    return int.from_bytes(hashlib.sha1((salt + key).encode("utf-8")).digest()[:8], "big") / 2.0 ** 64


def split_of(key: str, val_fraction: float, salt: str = "") -> str:
    """'val' or 'train' from a stable hash of the sample key (same on every machine and run)."""
    return "val" if split_position(key, salt) < val_fraction else "train"


@dataclass
class ShardInfo:
    path: str  # relative to the manifest's root
    source: str
    split: str
    samples: int = 0
    text_tokens: int = 0
    images: int = 0


@dataclass
class Manifest:
    root: str  # absolute directory of manifest.json
    tokenizer: str  # as stored (relative to root)
    sources: list[str] = field(default_factory=list)
    shards: list[ShardInfo] = field(default_factory=list)

    @property
    def tokenizer_path(self) -> str:
        return os.path.join(self.root, self.tokenizer)

    def select(self, source: str, split: str) -> list[ShardInfo]:
        """Shards of one source and split, sorted by path (the canonical order)."""
        return sorted((s for s in self.shards if s.source == source and s.split == split),
                      key=lambda s: s.path)

    def abspath(self, shard: ShardInfo) -> str:
        return os.path.join(self.root, shard.path)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Write documents of one (source, split) into numbered tars of at most `max_samples` each."""

    def __init__(self, root: str, source: str, split: str, max_samples: int = 1000, tag: str = ""):
        """tag: inserted into shard names ({split}-{tag}-{i:05d}.tar) so that several writers of
        one (source, split), e.g. one per ingest input file, never collide."""
        if max_samples < 1:
            raise ValueError(f"ShardWriter: max_samples must be >= 1, got {max_samples}")
        self.root, self.source, self.split, self.max_samples = root, source, split, max_samples
        self.tag = f"{tag}-" if tag else ""
        self.infos: list[ShardInfo] = []
        self._tar: Optional[tarfile.TarFile] = None
        os.makedirs(os.path.join(root, source), exist_ok=True)

    def _open_next(self) -> None:
        self.close()
        rel = f"{self.source}/{self.split}-{self.tag}{len(self.infos):05d}.tar"
        self.infos.append(ShardInfo(path=rel, source=self.source, split=self.split))
        self._tar = tarfile.open(os.path.join(self.root, rel), "w", format=tarfile.USTAR_FORMAT)

    def write(self, key: str, parts: list, images: list[bytes], meta: Optional[dict] = None) -> None:
        """parts: token-id lists and int image indices into `images` (JPEG bytes)."""
        if "." in key or "/" in key:
            raise ValueError(f"ShardWriter.write: key {key!r} must not contain '.' or '/'")
        n_tokens = 0
        for part in parts:
            if isinstance(part, int):
                if not 0 <= part < len(images):
                    raise ValueError(f"ShardWriter.write: {key}: image index {part} out of range")
            else:
                n_tokens += len(part)
        if self._tar is None or self.infos[-1].samples >= self.max_samples:
            self._open_next()
        doc = {"source": self.source, "parts": [p if isinstance(p, int) else [int(t) for t in p]
                                                 for p in parts]}
        if meta:
            doc["meta"] = meta
        _add_bytes(self._tar, f"{key}.json", json.dumps(doc, separators=(",", ":")).encode())
        for k, data in enumerate(images):
            _add_bytes(self._tar, f"{key}.img{k}.jpg", data)
        info = self.infos[-1]
        info.samples += 1
        info.text_tokens += n_tokens
        info.images += len(images)

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None


def write_manifest(root: str, tokenizer: str, sources: list[str], shards: list[ShardInfo]) -> str:
    path = os.path.join(root, "manifest.json")
    with open(path, "w") as f:
        json.dump({"tokenizer": tokenizer, "sources": list(sources),
                   "shards": [asdict(s) for s in shards]}, f, indent=1)
    return path


def load_manifest(root: str) -> Manifest:
    """Read ROOT/manifest.json; ValueError naming the file when missing or malformed."""
    path = os.path.join(root, "manifest.json")
    if not os.path.isfile(path):
        raise ValueError(f"load_manifest: no manifest at {path} (run tools/make_demo_data.py "
                         f"or an ingest tool first)")
    try:
        with open(path) as f:
            d = json.load(f)
        shards = [ShardInfo(**s) for s in d["shards"]]
        return Manifest(root=os.path.abspath(root), tokenizer=d["tokenizer"],
                        sources=list(d["sources"]), shards=shards)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"load_manifest: malformed manifest {path}: {e!r}") from e


@dataclass
class RawSample:
    key: str
    doc: dict  # the KEY.json content
    images: list[bytes]  # image k at index k


class TarIndex:
    """Random access to the samples of one webdataset tar: keys in file order, members by extension.

    The base of ShardReader (documents) and RowShardReader (packed rows, offline/rows.py); resharding copies
    samples of either kind member by member through it.
    """

    def __init__(self, path: str):
        self.path = path
        try:
            self._tar = tarfile.open(path, "r")
            members = self._tar.getmembers()
        except (OSError, tarfile.TarError) as e:
            raise ValueError(f"cannot read shard {path}: {e}") from e
        self.members: dict[str, dict[str, tarfile.TarInfo]] = {}
        self.keys: list[str] = []
        for m in members:
            if not m.isfile():
                continue
            key, _, ext = os.path.basename(m.name).partition(".")
            if key not in self.members:
                self.members[key] = {}
                self.keys.append(key)
            self.members[key][ext] = m
        for key in self.keys:
            if "json" not in self.members[key]:
                raise ValueError(f"shard {path}: sample {key} has no .json")

    def read_member(self, key: str, ext: str) -> bytes:
        try:
            return self._tar.extractfile(self.members[key][ext]).read()
        except (KeyError, OSError, tarfile.TarError) as e:
            raise ValueError(f"shard {self.path}: cannot read {key}.{ext}: {e!r}") from e

    def read_json(self, key: str) -> dict:
        try:
            return json.loads(self.read_member(key, "json"))
        except json.JSONDecodeError as e:
            raise ValueError(f"shard {self.path}: bad json in sample {key}: {e!r}") from e

    def close(self) -> None:
        self._tar.close()


class ShardReader(TarIndex):
    """Random access to the samples of one document shard: keys in file order, `read(key)` -> RawSample."""

    def read(self, key: str) -> RawSample:
        doc = self.read_json(key)
        exts = self.members[key]
        n_img = max([p + 1 for p in doc.get("parts", []) if isinstance(p, int)] + [0])
        images = []
        for k in range(n_img):
            m = exts.get(f"img{k}.jpg")
            if m is None:
                raise ValueError(f"shard {self.path}: sample {key} lacks img{k}.jpg")
            images.append(self.read_member(key, f"img{k}.jpg"))
        return RawSample(key=key, doc=doc, images=images)

    def __iter__(self):
        for key in self.keys:
            yield self.read(key)
