"""Command-line options shared by tools/generate.py and tools/evaluate.py: which model, on which
device and in which precision, and how to decode."""
from __future__ import annotations

import argparse

import torch

from pretrain.generate.loading import InferenceModel, load_for_generation
from pretrain.generate.sampling import GenerationConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="a run directory (newest complete checkpoint), a checkpoint step directory, "
                        "or an export directory (tools/export.py)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights and activations")
    p.add_argument("--tokenizer-model", default=None,
                   help="sentencepiece .model file (default: the run's, or the export's)")


def add_generation_args(p: argparse.ArgumentParser, max_new_tokens: int = 32) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable); EOS always stops")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    p.add_argument("--no-cache", action="store_true",
                   help="recompute the whole sequence every step instead of using the KV cache (slow; a check)")


def model_from_args(args: argparse.Namespace) -> InferenceModel:
    return load_for_generation(args.checkpoint, device=args.device, dtype=DTYPES[args.dtype],
                               tokenizer_path=args.tokenizer_model)


def generation_config_from_args(args: argparse.Namespace) -> GenerationConfig:
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                           top_k=args.top_k, stop=list(args.stop), seed=args.seed, use_cache=not args.no_cache)
    cfg.validate()
    return cfg
