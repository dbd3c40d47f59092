"""Typed run configuration: YAML recipes, dotted command-line overrides, validation.

Each component owns a dataclass (model, data, training, ...) and this file composes them into
`RunConfig`. A recipe is a YAML file whose top-level keys are the sections below; overrides are
`section.field=value` strings (`train.max_steps=200 model.width=256`), parsed as YAML scalars.
Unknown keys are rejected with the nearest valid name, before any process starts.

Check a config (what launch.sh does before starting DeepSpeed):

    python -m pretrain.config pretrain/configs/demo.yaml --world-size 2 train.max_steps=10 train.warmup_steps=2
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pretrain.config_checks import CheckError, check_environment, check_values
from pretrain.data.config import DataConfig
from pretrain.models.config import ModelConfig


class ConfigError(ValueError):
    """A configuration problem, with the dotted key that caused it."""


@dataclass
class RunSection:
    name: str = "run"  # run name, used in logs and wandb
    dir: str = ""  # run directory (config, metrics, checkpoints); "" -> runs/<name>
    seed: int = 0  # seed for model init; data order has its own seed (data.seed)
    log_every: int = 10  # steps between metrics.jsonl/console lines
    wandb: bool = True  # log to wandb (offline unless wandb_mode says otherwise)
    wandb_mode: str = "offline"  # offline | online | disabled; online needs WANDB_API_KEY
    wandb_project: str = "native-mm-pretrain"  # wandb project name


@dataclass
class TrainSection:
    max_steps: int = 1000  # optimizer steps in the whole run (sets the schedule)
    global_batch_size: int = 16  # rows per optimizer step, over all ranks and accumulation
    micro_batch_size: int = 4  # rows per rank per forward pass
    lr: float = 1.5e-3  # peak learning rate
    warmup_steps: int = 100  # linear warm-up from 0 to lr
    cooldown_fraction: float = 0.2  # last fraction of steps decays to 0 with the 1 - sqrt shape
    weight_decay: float = 1e-4  # fully decoupled: not scaled by the peak learning rate
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # global gradient-norm clip
    precision: str = "auto"  # auto (bf16 where the hardware has it, else fp32) | bf16 | fp32
    zero_stage: int = 2  # ZeRO stage 0-3; picks ds_configs/zero<stage>.json as the base
    ds_base: str = ""  # explicit DeepSpeed base config path; "" -> ds_configs/zero<stage>.json
    eval_every: int = 200  # steps between held-out evaluations (and one at the end)
    eval_batches: int = 8  # micro-batches per source per rank in each evaluation
    save_every: int = 200  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 2  # newest complete checkpoints kept in the run directory
    stop_after_steps: int = 0  # >0: stop this process after that many steps (simulated interruption)
    max_skipped_steps: int = 10  # this many consecutive non-finite steps (skipped) stop the run
    init_from: str = ""  # run dir or checkpoint step dir: start from its weights (fresh optimizer, schedule, data)
    image_probe: bool = False  # demo only: colour/shape accuracy on held-out captions at the end
    probe_examples: int = 256  # held-out captions used by the image probe


@dataclass
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainSection = field(default_factory=TrainSection)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir or f"runs/{self.run.name}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self, world_size: int | None = None) -> None:
        t = self.train
        for key in ("max_steps", "global_batch_size", "micro_batch_size"):
            if getattr(t, key) <= 0:
                raise ConfigError(f"train.{key} must be positive, got {getattr(t, key)}")
        if t.global_batch_size % t.micro_batch_size:
            raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not a multiple of "
                              f"train.micro_batch_size={t.micro_batch_size}")
        if world_size is not None and t.global_batch_size % (t.micro_batch_size * world_size):
            raise ConfigError(
                f"train.global_batch_size={t.global_batch_size} is not divisible by "
                f"train.micro_batch_size * world_size = {t.micro_batch_size} * {world_size}")
        if not 0 <= t.cooldown_fraction <= 1:
            raise ConfigError(f"train.cooldown_fraction must lie in [0, 1], got {t.cooldown_fraction}")
        if t.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
        if t.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"train.precision must be auto, bf16 or fp32, got {t.precision!r}")
        if t.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"train.zero_stage must be 0-3, got {t.zero_stage}")
        if self.model.patch_size != self.data.patch_size:
            raise ConfigError(f"model.patch_size={self.model.patch_size} differs from "
                              f"data.patch_size={self.data.patch_size}")
        if self.model.kind == "late" and self.model.image_size != self.data.image_size:
            # The ViT's position table is sized for model.image_size; other images would be
            # silently cut into the wrong number of patches per image.
            raise ConfigError(f"model.image_size={self.model.image_size} must equal data.image_size="
                              f"{self.data.image_size} for model.kind=late")
        # MoE + DeepSpeed (pretrain/models/moe_parallel.py): ZeRO-3 does not shard our expert
        # parameters, and without ZeRO DeepSpeed's gradient clipping averages per-rank norms,
        # which is wrong once ranks hold different experts.
        if self.model.kind == "moe":
            ep = self.model.moe.expert_parallel_size
            if t.zero_stage == 3:
                raise ConfigError("train.zero_stage=3 is not supported with model.kind=moe (DeepSpeed's "
                                  "ZeRO-3 does not handle expert-parallel MoE parameters); use "
                                  "train.zero_stage=1 or 2")
            if t.zero_stage == 0 and ep > 1:
                raise ConfigError(f"model.moe.expert_parallel_size={ep} needs train.zero_stage=1 or 2 "
                                  f"(without ZeRO the clipped gradient norm is wrong across expert shards)")
            if ep < 1 or (world_size is not None and world_size % ep):
                raise ConfigError(f"model.moe.expert_parallel_size={ep} must be >= 1 and divide the "
                                  f"world size {world_size}")
        if self.model.kind == "late" and self.model.vision.init_from:
            from pretrain.models.vision_hf import check_config
            try:  # the pretrained tower's architecture, before any process starts
                check_config(self.model)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if self.run.wandb_mode not in ("offline", "online", "disabled"):
            raise ConfigError(f"run.wandb_mode must be offline, online or disabled, got {self.run.wandb_mode!r}")
        for section, prefix in ((self.model, "model"), (self.data, "data")):
            try:
                section.validate()
            except ValueError as e:
                msg = str(e).replace("DataConfig.", "data.").replace("ModelConfig.", "model.")
                raise ConfigError(msg if msg.startswith(prefix + ".") else f"{prefix}.{msg}") from None
        try:
            check_values(self)
        except CheckError as e:
            raise ConfigError(str(e)) from None

    def check_environment(self) -> None:
        """The data directory, sources and tokenizer exist and fit the model (reads files)."""
        try:
            check_environment(self)
        except CheckError as e:
            raise ConfigError(str(e)) from None


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown_key(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{where}{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"
    return ConfigError(f"unknown config key '{where}{key}'{hint}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the annotated field type, or raise naming the key."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping, got {value!r}")
        return _build(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"'{key}': cannot read {value!r} as {tp}")
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):  # allow `data.weights=[0.5,0.5]` and comma lists
            value = yaml.safe_load(value) if value.startswith("[") else value.split(",")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{key}' must be a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"'{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"'{key}' must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads 1e-3 as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{key}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, str) and value.strip().lower() == "auto" and key.endswith("batch_size"):
            raise ConfigError(f"'{key}': \"auto\" is not allowed; give a number")
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"'{key}' must be a string, got {value!r}")
        return str(value)
    raise ConfigError(f"'{key}': unsupported field type {tp}")


def _build(cls, values: dict, where: str = ""):
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in types_:
            raise _unknown_key(key, list(types_), where)
        kwargs[key] = _coerce(value, types_[key], where + key)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a section")
    node[parts[-1]] = value


def _check_override_path(dotted: str) -> None:
    cls = RunConfig
    parts = dotted.split(".")
    where = ""
    for i, p in enumerate(parts):
        types_ = _field_types(cls)
        if p not in types_:
            raise _unknown_key(p, list(types_), where)
        tp = types_[p]
        where += p + "."
        if i < len(parts) - 1:
            if not dataclasses.is_dataclass(tp):
                raise ConfigError(f"override '{dotted}': '{where[:-1]}' has no sub-keys")
            cls = tp


def parse_overrides(overrides: list[str]) -> dict:
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        _check_override_path(key)
        _set_dotted(tree, key, yaml.safe_load(raw) if raw != "" else "")
    return tree


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML recipe, apply dotted overrides, build and validate the typed config."""
    tree: dict = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    tree = _merge(tree, parse_overrides(list(overrides)))
    cfg = _build(RunConfig, tree)
    cfg.validate()
    return cfg


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Validate a run config (and print it resolved).")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.add_argument("--world-size", type=int, default=None, help="data-parallel ranks, to check batch sizes")
    p.add_argument("--print", action="store_true", help="print the resolved config")
    p.add_argument("--skip-files", action="store_true",
                   help="check values only, not the data directory and tokenizer")
    args = p.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        cfg.validate(args.world_size)
        if not args.skip_files:
            cfg.check_environment()
        from pretrain.ds_config import build_ds_config  # also checks the DeepSpeed base file
        build_ds_config(cfg, world_size=args.world_size or 1)
    except ValueError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
