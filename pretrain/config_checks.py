"""Checks of a run config beyond its types, each error naming the dotted key.

`check_values` needs nothing but the config (RunConfig.validate calls it); `check_environment`
also reads the data directory (manifest, tokenizer) and runs in `python -m pretrain.config`, which
launch.sh (and the SLURM example) call before any rank starts, and again at the start of training.
"""
from __future__ import annotations

import os


class CheckError(ValueError):
    """A bad value; pretrain.config turns it into a ConfigError."""


def _require(ok: bool, key: str, why: str, value) -> None:
    if not ok:
        raise CheckError(f"{key} {why}, got {value!r}")


def check_values(cfg) -> None:
    """Ranges and cross-field rules of the run, training and model sections."""
    t, r, m = cfg.train, cfg.run, cfg.model
    _require(t.lr > 0, "train.lr", "must be > 0", t.lr)
    _require(t.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 turns clipping off)", t.grad_clip)
    _require(t.weight_decay >= 0, "train.weight_decay", "must be >= 0", t.weight_decay)
    for key in ("beta1", "beta2"):
        v = getattr(t, key)
        _require(0 <= v < 1, f"train.{key}", "must lie in [0, 1)", v)
    _require(t.eps > 0, "train.eps", "must be > 0", t.eps)
    _require(t.warmup_steps <= t.max_steps, "train.warmup_steps",
             f"is longer than the run (train.max_steps={t.max_steps})", t.warmup_steps)
    for key in ("eval_every", "eval_batches", "save_every", "max_skipped_steps"):
        _require(getattr(t, key) >= 1, f"train.{key}", "must be >= 1", getattr(t, key))
    _require(t.keep_checkpoints >= 0, "train.keep_checkpoints", "must be >= 0 (0 keeps all)", t.keep_checkpoints)
    _require(t.stop_after_steps >= 0, "train.stop_after_steps", "must be >= 0 (0: run to the end)",
             t.stop_after_steps)
    if t.image_probe:
        _require(t.probe_examples >= 1, "train.probe_examples", "must be >= 1 with train.image_probe", t.probe_examples)
    _require(r.log_every >= 1, "run.log_every", "must be >= 1", r.log_every)
    _require(bool(r.name) and "/" not in r.name, "run.name", "must be non-empty, without '/'", r.name)
    _require(m.norm_eps > 0, "model.norm_eps", "must be > 0", m.norm_eps)
    _require(m.rope_theta > 0, "model.rope_theta", "must be > 0", m.rope_theta)
    _require(m.init_std > 0, "model.init_std", "must be > 0", m.init_std)
    _require(m.ffn_hidden >= 0, "model.ffn_hidden", "must be >= 0 (0: the default size)", m.ffn_hidden)
    if m.kind == "late":
        for key in ("width", "depth", "head_dim"):
            v = getattr(m.vision, key)
            _require(v > 0, f"model.vision.{key}", "must be > 0", v)
        _require(m.vision.lr_mult >= 0, "model.vision.lr_mult", "must be >= 0", m.vision.lr_mult)
    if m.kind == "moe":
        from kernels.grouped_gemm import BACKENDS
        _require(m.moe.backend in BACKENDS, "model.moe.backend", f"must be one of {', '.join(BACKENDS)}",
                 m.moe.backend)
        for key in ("aux_loss_weight", "z_loss_weight"):
            v = getattr(m.moe, key)
            _require(v >= 0, f"model.moe.{key}", "must be >= 0", v)


def check_environment(cfg) -> None:
    """The data the run will read: root and manifest, its sources, the tokenizer and its size."""
    from pretrain.data.shards import load_manifest
    from pretrain.data.tokenizer import Tokenizer

    d = cfg.data
    _require(os.path.isdir(d.root), "data.root", "is not a directory", d.root)
    try:
        manifest = load_manifest(d.root)
    except ValueError as e:
        raise CheckError(f"data.root: {e}") from None
    if d.format == "documents":
        present = sorted({s.source for s in manifest.shards if s.split == "train"})
        for name in d.sources:
            _require(name in present, "data.sources",
                     f"names a source with no training shards in {d.root}/manifest.json "
                     f"(it has: {', '.join(present) or 'none'})", name)
    else:
        _require(bool(d.rows_root) and os.path.isfile(os.path.join(d.rows_root, "manifest.json")),
                 "data.rows_root", "holds no manifest.json from tools/pack_shards.py", d.rows_root)
    tok_path = d.tokenizer or manifest.tokenizer_path
    _require(os.path.isfile(tok_path), "data.tokenizer" if d.tokenizer else "data.root",
             "names a tokenizer file that does not exist" if d.tokenizer else
             f"has a manifest whose tokenizer file is missing ({tok_path})", d.tokenizer or d.root)
    vocab = Tokenizer(tok_path).vocab_size
    _require(cfg.model.vocab_size >= vocab, "model.vocab_size",
             f"is smaller than the tokenizer's {vocab} pieces ({tok_path})", cfg.model.vocab_size)
