"""Packed-row shards: training rows fixed offline, images still JPEG, layout ready for PackedBatch.

`tools/pack_shards.py` (logic in `pack.py`) writes them; `row_loader.py` reads them;
`tools/reshard.py` (logic in `reshard.py`) rebalances them. One row = one sample of a tar:

    KEY.json   {"source": "caption",                 # the row's mixture slot (its padding's source)
                "tokens": 241, "padding": 15,         # non-padding tokens and padding of the row
                "pieces": [{"source": "caption",      # the document's source (text filling mixes them)
                            "key": "caption0000042",  # the document's key in its training shard
                            "ref": [0, 17, 0, 0],     # (epoch, index, piece, cut offset) in its stream
                            "length": 30,             # tokens of this piece, image spans included
                            "parts": [[2, 81, 9], 0, [5, 3]]}, ...],   # token ids; int k = image k
                "images": [["caption", 0, 0, 17, 0], ...]}  # per image k: its augmentation key
    KEY.img{k}.jpg  the JPEG bytes of image k of the row, exactly as stored by ingest

Token lists hold the ids exactly as the online packer lays them out (BOS/EOS included, <boi>/<eoi>
NOT included: an image part expands to <boi>, n_patches patches, <eoi> at load time, as online).
An image's key [source, stream offset, epoch, index, part] names the generator the online loader
draws its crop and flip from: rng(seed, stream_id, epoch, index, part), stream_id = source index
+ offset (0 for a source's own stream, loader.FILL_STREAM for the tail-fill cursor). Augmenting
at load time from that generator gives the very patches the online path produces (row_loader.py).

Directory layout: ROOT/{source}/{split}-{i:05d}.tar and ROOT/manifest.json:
    {"format": "packed_rows", "version": 1, "seq_len": 256, "n_patches": 16, "image_size": 32,
     "patch_size": 8, "tokenizer": ".../tokenizer.model", "sources": [...],
     "pack": {...how the rows were packed...}, "per_source": {...totals...},
     "shards": [{"path", "source", "split", "rows", "tokens", "padding", "images", "pieces"}, ...],
     "errors": [...unreadable inputs...], "balance": {...written by reshard...}}
Tars are written with fixed mtimes/owners, to a temporary name then renamed, so a shard that
exists is complete (tools skip it on restart) and output is byte-stable.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import asdict, dataclass, field
from typing import Iterator, Optional

from pretrain.data.shards import TarIndex  # base of RowShardReader; reshard.py and pack.py import it here

ROWS_FORMAT = "packed_rows"
ROWS_VERSION = 1


@dataclass
class RowPiece:
    """One document (or one piece of a split document) inside a packed row."""
    source: str  # source name of the document (a caption row may hold text pieces when filled)
    key: str  # the document's key in its training shard (debugging, tests)
    ref: list  # online piece ref: [epoch, index, piece(, cut offset)], or ["fill", epoch, index, offset]
    length: int  # tokens it occupies in the row (BOS/EOS and whole image spans included)
    parts: list  # token-id lists and int indices into the row's images


@dataclass
class PackedRow:
    """A row of seq_len tokens: its pieces in layout order and its images as JPEG bytes."""
    source: str  # the row's mixture slot: rows per source are counted by it; padding gets it
    pieces: list[RowPiece]
    images: list[bytes]  # JPEG bytes of image k
    image_keys: list[list]  # per image k: [source, stream offset, epoch, index, part] (augmentation)
    seq_len: int = 0  # filled by the reader from the manifest; used for padding statistics

    @property
    def tokens(self) -> int:
        """Non-padding tokens of the row."""
        return sum(p.length for p in self.pieces)

    def to_json(self) -> dict:
        return {"source": self.source, "tokens": self.tokens,
                "padding": (self.seq_len - self.tokens) if self.seq_len else None,
                "pieces": [asdict(p) for p in self.pieces], "images": self.image_keys}

    @classmethod
    def from_json(cls, d: dict, images: list[bytes], seq_len: int = 0) -> "PackedRow":
        return cls(source=d["source"], pieces=[RowPiece(**p) for p in d["pieces"]], images=images,
                   image_keys=[list(k) for k in d["images"]], seq_len=seq_len)


@dataclass
class RowShardInfo:
    """One row shard as the manifest lists it."""
    path: str  # relative to the manifest's root
    source: str  # the rows' mixture slot
    split: str
    rows: int = 0
    tokens: int = 0  # non-padding tokens
    padding: int = 0  # padding tokens (rows * seq_len - tokens)
    images: int = 0
    pieces: int = 0  # documents or document pieces


@dataclass
class RowManifest:
    """ROOT/manifest.json of a packed-row shard set (see the module docstring)."""
    root: str  # absolute directory of manifest.json
    seq_len: int
    image_size: int
    patch_size: int
    n_patches: int
    tokenizer: str  # absolute path, or relative to root
    sources: list[str] = field(default_factory=list)
    shards: list[RowShardInfo] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # pack, per_source, errors, balance (informational)

    def select(self, source: str, split: str = "train") -> list[RowShardInfo]:
        """Shards of one row source and split, sorted by path (the canonical order)."""
        return sorted((s for s in self.shards if s.source == source and s.split == split),
                      key=lambda s: s.path)

    def abspath(self, shard: RowShardInfo) -> str:
        return os.path.join(self.root, shard.path)

    @property
    def tokenizer_path(self) -> str:
        return os.path.join(self.root, self.tokenizer)


def is_row_manifest(root: str) -> bool:
    """True when ROOT/manifest.json describes packed rows (else it is ingest output)."""
    try:
        with open(os.path.join(root, "manifest.json")) as f:
            return json.load(f).get("format") == ROWS_FORMAT
    except (OSError, json.JSONDecodeError):
        return False


def write_row_manifest(m: RowManifest) -> str:
    d = {"format": ROWS_FORMAT, "version": ROWS_VERSION, "seq_len": m.seq_len,
         "image_size": m.image_size, "patch_size": m.patch_size, "n_patches": m.n_patches,
         "tokenizer": m.tokenizer, "sources": list(m.sources)}
    d.update(m.extra)
    d["shards"] = [asdict(s) for s in sorted(m.shards, key=lambda s: s.path)]
    path = os.path.join(m.root, "manifest.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(d, f, indent=1)
    os.replace(tmp, path)  # never leave a half-written manifest behind
    return path


def load_row_manifest(root: str) -> RowManifest:
    """Read ROOT/manifest.json of packed rows; ValueError naming the file when wrong."""
    path = os.path.join(root, "manifest.json")
    if not os.path.isfile(path):
        raise ValueError(f"load_row_manifest: no manifest at {path} (run tools/pack_shards.py first)")
    try:
        with open(path) as f:
            d = json.load(f)
        if d.get("format") != ROWS_FORMAT:
            raise ValueError(f"load_row_manifest: {path} is not a packed-row manifest "
                             f"(format={d.get('format')!r}); pack it with tools/pack_shards.py")
        if d.get("version") != ROWS_VERSION:
            raise ValueError(f"load_row_manifest: {path} has version {d.get('version')}, "
                             f"this code reads {ROWS_VERSION}")
        known = {"format", "version", "seq_len", "image_size", "patch_size", "n_patches", "tokenizer",
                 "sources", "shards"}
        return RowManifest(root=os.path.abspath(root), seq_len=int(d["seq_len"]),
                           image_size=int(d["image_size"]), patch_size=int(d["patch_size"]),
                           n_patches=int(d["n_patches"]), tokenizer=d["tokenizer"],
                           sources=list(d["sources"]), shards=[RowShardInfo(**s) for s in d["shards"]],
                           extra={k: v for k, v in d.items() if k not in known})
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"load_row_manifest: malformed manifest {path}: {e!r}") from e


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata: the same rows give byte-identical tars on every machine.
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


class AtomicTarWriter:
    """A tar written under PATH.tmp and renamed to PATH on close(): PATH exists only when complete,
    which is what makes the tools' restart idempotent (an existing output shard is skipped)."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.path, self._tmp = path, path + ".tmp"
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)

    def add(self, name: str, data: bytes) -> None:
        _add_bytes(self._tar, name, data)

    def close(self) -> None:
        self._tar.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._tar.close()
        if os.path.exists(self._tmp):
            os.remove(self._tmp)


class RowShardWriter(AtomicTarWriter):
    """Write PackedRows into one tar (atomically) and count what the manifest needs."""

    def __init__(self, path: str, info: RowShardInfo, seq_len: int):
        super().__init__(path)
        self.info, self.seq_len = info, seq_len

    def write(self, key: str, row: PackedRow) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"RowShardWriter.write: key {key!r} must not contain '.' or '/'")
        if row.tokens > self.seq_len:
            raise ValueError(f"RowShardWriter.write: row {key} holds {row.tokens} tokens > seq_len {self.seq_len}")
        row.seq_len = self.seq_len
        self.add(f"{key}.json", json.dumps(row.to_json(), separators=(",", ":")).encode())
        for k, data in enumerate(row.images):
            self.add(f"{key}.img{k}.jpg", data)
        self.info.rows += 1
        self.info.tokens += row.tokens
        self.info.padding += self.seq_len - row.tokens
        self.info.images += len(row.images)
        self.info.pieces += len(row.pieces)


class RowShardReader(TarIndex):
    """Random access to the rows of one row shard: `keys` in file order, `read(key)` -> PackedRow."""

    def __init__(self, path: str, seq_len: int = 0):
        super().__init__(path)
        self.seq_len = seq_len

    def read(self, key: str) -> PackedRow:
        d = self.read_json(key)
        images = [self.read_member(key, f"img{k}.jpg") for k in range(len(d["images"]))]
        return PackedRow.from_json(d, images, self.seq_len)

    def __iter__(self) -> Iterator[PackedRow]:
        for key in self.keys:
            yield self.read(key)


def row_shard_info_of(path: str, rel: str, split: str, seq_len: int) -> Optional[RowShardInfo]:
    """Recount an existing row shard (used by reshard, which trusts the data over old manifests)."""
    r = RowShardReader(path, seq_len)
    info: Optional[RowShardInfo] = None
    try:
        for key in r.keys:
            d = r.read_json(key)
            if info is None:
                info = RowShardInfo(path=rel, source=d["source"], split=split)
            info.rows += 1
            info.tokens += int(d["tokens"])
            info.padding += seq_len - int(d["tokens"])
            info.images += len(d["images"])
            info.pieces += len(d["pieces"])
    finally:
        r.close()
    return info
