"""The data pipeline: demo corpus, tokenizer, shards + manifest, packing, train/eval loaders.

Modules, one idea each:
  config.py     DataConfig (the `data:` section of a recipe)
  tokenizer.py  sentencepiece training + Tokenizer wrapper (control symbols <boi> <eoi> ...)
  shards.py     webdataset shard writer/reader, manifest, train/val split by key hash
  images.py     decode, random-resized-crop/flip, normalise, patchify
  packing.py    documents -> pieces -> best-fit rows -> PackedBatch
  loader.py     build_train_loader (infinite, exact resume), build_eval_batches
  demo.py       the synthetic coloured-shapes corpus (tools/make_demo_data.py)
"""
from pretrain.data.config import DataConfig
from pretrain.data.loader import TrainLoader, build_eval_batches, build_train_loader, load_tokenizer
from pretrain.data.packing import Document, pack_documents
from pretrain.data.shards import Manifest, ShardInfo, load_manifest
from pretrain.data.tokenizer import Tokenizer, train_tokenizer

__all__ = ["DataConfig", "TrainLoader", "build_train_loader", "build_eval_batches", "load_tokenizer",
           "Document", "pack_documents", "Manifest", "ShardInfo", "load_manifest", "Tokenizer",
           "train_tokenizer"]
