"""The data pipeline, by stage: ingest -> shards + manifest -> packing -> loaders -> PackedBatch.

  ingest/       stage 1: raw web data (captions, interleaved, text) -> shards (tools/prepare_data.py)
  corpora/      generated corpora written as shards: the demo set, synthetic web-like benchmarks
  (core, this folder: shards to batches)
  config.py     DataConfig (the `data:` section of a recipe)
  tokenizer.py  sentencepiece training + Tokenizer wrapper (control symbols <boi> <eoi> ...)
  shards.py     webdataset shard writer/reader, manifest, train/val split by key hash
  images.py     decode, random-resized-crop/flip, normalise, patchify
  packing.py    documents -> pieces -> best-fit rows (cut-to-fit) -> PackedBatch
  mixture.py    exact per-global-batch row quotas per source
  loader.py     build_train_loader (infinite, exact resume, balanced rank split, tail fill),
                build_eval_batches
  lazy_images.py  deferred image decoding: rows planned from lengths, pixels made at batch build
  workers.py    worker processes (data.num_workers) that build the same batches at any count
  stats.py      per-batch statistics: padding, rows/tokens per source, images per row
  offline/      optional: rows packed ahead of time (tools/pack_shards.py), their loader
                (data.format=packed_rows), token-balanced resharding (tools/reshard.py)
"""
from pretrain.data.config import DataConfig
from pretrain.data.loader import TrainLoader, build_eval_batches, build_train_loader, load_tokenizer
from pretrain.data.packing import Document, pack_documents
from pretrain.data.shards import Manifest, ShardInfo, load_manifest
from pretrain.data.tokenizer import Tokenizer, train_tokenizer

__all__ = ["DataConfig", "TrainLoader", "build_train_loader", "build_eval_batches", "load_tokenizer",
           "Document", "pack_documents", "Manifest", "ShardInfo", "load_manifest", "Tokenizer",
           "train_tokenizer"]
