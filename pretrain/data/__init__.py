"""The data pipeline: demo corpus, tokenizer, shards + manifest, packing, train/eval loaders.

Modules, one idea each:
  config.py     DataConfig (the `data:` section of a recipe)
  tokenizer.py  sentencepiece training + Tokenizer wrapper (control symbols <boi> <eoi> ...)
  shards.py     webdataset shard writer/reader, manifest, train/val split by key hash
  images.py     decode, random-resized-crop/flip, normalise, patchify
  packing.py    documents -> pieces -> best-fit rows (cut-to-fit) -> PackedBatch
  mixture.py    exact per-global-batch row quotas per source
  loader.py     build_train_loader (infinite, exact resume, balanced rank split, tail fill),
                build_eval_batches
  stats.py      per-batch statistics: padding, rows/tokens per source, images per row
  ingest.py     ingest driver: image prep at ingest, skip accounting, resumable per-file tasks
  ingest_io.py  robust readers: JSONL (.gz/.zst), parquet, streamed webdataset tars
  ingest_captions.py / ingest_interleaved.py / ingest_text.py   the three input formats
  synthetic.py  web-like synthetic corpora for benchmarks (tools/bench_data.py, pack_stats.py)
  demo.py       the synthetic coloured-shapes corpus (tools/make_demo_data.py)
  rows.py       packed-row shards: tokens, layout and the images still as JPEG, + manifest
  offline_pack.py  offline packing (tools/pack_shards.py): the online packer's own rows, fixed once
  row_loader.py build_row_loader: the loader over packed rows (data.format=packed_rows)
  reshard.py    rewrite any shard set into N shards balanced by tokens (tools/reshard.py)
"""
from pretrain.data.config import DataConfig
from pretrain.data.loader import TrainLoader, build_eval_batches, build_train_loader, load_tokenizer
from pretrain.data.packing import Document, pack_documents
from pretrain.data.shards import Manifest, ShardInfo, load_manifest
from pretrain.data.tokenizer import Tokenizer, train_tokenizer

__all__ = ["DataConfig", "TrainLoader", "build_train_loader", "build_eval_batches", "load_tokenizer",
           "Document", "pack_documents", "Manifest", "ShardInfo", "load_manifest", "Tokenizer",
           "train_tokenizer"]
