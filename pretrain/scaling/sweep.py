"""Sweep generation: one training run per (preset, token or FLOP budget), with the paper's
optimisation rules (appendix A, Table 6).

Per run: steps = D / (global_batch_size * seq_len) (rounded, at least 1; the run's real D is
steps * batch * seq_len); the preset's learning rate; warm-up 1k steps for runs under 5k steps,
2.5k for 5k-15k, 5k beyond (the paper: "1k and 2.5k for 1k-4k and 5k-15k steps, at most 5k"),
and for the MoE 2.5k for every run under 20k steps (5k beyond), also where it overlaps the
cool-down (the last 20%). Where the paper's warm-up is as long as the run itself (MoE runs under
2.5k steps) it cannot be followed: the warm-up then ends where the cool-down starts, and the
manifest's `warmup_note` column and a printed warning say so. Runs shorter than 1k steps (demo
sweeps, outside the paper's range) warm up for 10% of their steps. A FLOP budget C gives D = C / (6 N)
(late fusion: C = 6 (N D + N_v rho D), rho = D_v / D = 0.544).

Demo sweeps: with `base_config` (e.g. the CPU demo YAML) and `widths`, model sizes are
`model.width` overrides of that config instead of the paper presets; their N is unknown here
(`--params` gives it, needed only for FLOP budgets) and `collect_runs` reads the exact count from
each run's summary. With `base_config` and presets, N in the manifest is the preset's nominal count.

Outputs, under the sweep directory: `overrides/<run>.yaml` (the run's overrides as a nested
mapping, for reading), `commands.sh` (one `CONFIG=<preset> ./launch.sh key=value ...` line per
run: dotted overrides are how the trainer takes changes), `manifest.csv` and `manifest.json`.

    python tools/sweep.py --kind early --presets 275m,468m --tokens 2.5e9,5e9 --out runs/sweep_early
"""
from __future__ import annotations

import csv
import json
import os
import re
import shlex
from dataclasses import asdict, dataclass, field

import yaml

from .presets import (LATE_FUSION_DV_RATIO, PAPER_BATCH_SIZE, PAPER_COOLDOWN_FRACTION, PAPER_SEQ_LEN,
                      get_preset)


def paper_warmup(steps: int, kind: str = "early") -> int | None:
    """The paper's warm-up for a run of `steps` (appendix A); None below its 1k-step range."""
    if steps < 1000:
        return None
    if kind == "moe":
        return 2500 if steps < 20000 else 5000
    return 1000 if steps < 5000 else (2500 if steps <= 15000 else 5000)


def warmup_plan(steps: int, kind: str = "early",
                cooldown_fraction: float = PAPER_COOLDOWN_FRACTION) -> tuple[int, str]:
    """(warm-up steps, note): the paper's rule wherever it fits in the run, else a visible deviation.

    - paper: its value, also when it overlaps the cool-down (the schedule then takes the smaller
      of the two multipliers; a 1,192-step run warms up for 1k steps, as in the paper);
    - deviation when the paper's warm-up is not shorter than the run (MoE runs under 2.5k steps):
      the warm-up ends where the cool-down starts, so the peak learning rate is reached once;
    - runs under 1k steps (demo sweeps; the paper has no rule): 10% of the steps."""
    w = paper_warmup(steps, kind)
    if w is None:
        return max(1, round(0.1 * steps)), "below the paper's range: 10% of steps"
    if w < steps:
        overlap = w > steps - int(round(cooldown_fraction * steps))
        return w, "paper (overlaps the cool-down)" if overlap else "paper"
    clipped = max(1, int((1.0 - cooldown_fraction) * steps))
    return clipped, f"deviation: paper's {w} >= {steps} steps; ends at the cool-down"


def warmup_steps(steps: int, kind: str = "early", cooldown_fraction: float = PAPER_COOLDOWN_FRACTION) -> int:
    """The warm-up of `warmup_plan`."""
    return warmup_plan(steps, kind, cooldown_fraction)[0]


_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_amount(text: str) -> float:
    """'2.5e9', '2.5B', '600M', '1T', '3e19' -> float."""
    t = text.strip().lower()
    if t and t[-1] in _SUFFIX:
        return float(t[:-1]) * _SUFFIX[t[-1]]
    return float(t)


def format_amount(x: float) -> str:
    """Short label for run names: 2.5e9 -> '2.5B', 6e11 -> '600B', 3e19 -> '3e19'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= scale and x < 1000 * scale:
            return f"{x / scale:.4g}{unit}"
    return f"{x:.3g}".replace("+", "")


@dataclass
class SweepConfig:
    kind: str                                   # early | late | moe
    presets: list                               # preset names, e.g. ["275m", "468m"]
    tokens: list = field(default_factory=list)  # token budgets D
    flops: list = field(default_factory=list)   # FLOP budgets C (D derived per preset)
    global_batch_size: int = PAPER_BATCH_SIZE
    seq_len: int = PAPER_SEQ_LEN
    cooldown_fraction: float = PAPER_COOLDOWN_FRACTION
    config_dir: str = "pretrain/configs/paper"  # where the preset YAMLs live
    base_config: str | None = None              # use this YAML for every run instead of the presets
    runs_root: str = "runs"                     # run dirs are <runs_root>/<sweep name>/<run name>
    name: str = "sweep"
    lr: float | None = None                     # override the presets' learning rate
    dv_ratio: float = LATE_FUSION_DV_RATIO
    extra: list = field(default_factory=list)   # extra "key=value" overrides for every run
    widths: list = field(default_factory=list)  # with base_config: sizes as model.width overrides
                                                # (demo sweeps) instead of the paper presets
    params: list = field(default_factory=list)  # N per width (needed for FLOP budgets with widths)


@dataclass
class SweepRun:
    name: str
    kind: str
    preset: str
    config: str          # the YAML passed as CONFIG=
    run_dir: str
    N: float             # nominal parameters (paper table); collect_runs reads the exact count
    N_v: float
    D: float             # tokens the run will see: steps * batch * seq_len
    C: float             # FLOPs, 6 N D (+ 6 N_v D_v for late fusion)
    steps: int
    warmup_steps: int
    warmup_note: str     # paper | paper (overlaps the cool-down) | deviation: ... | below the paper's range
    lr: float
    cooldown_fraction: float
    global_batch_size: int
    seq_len: int
    overrides: dict = field(default_factory=dict)   # nested mapping
    command: str = ""


def _set_nested(tree: dict, dotted: str, value) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value


def _parse_value(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _format_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    return str(v)


@dataclass(frozen=True)
class _Size:
    name: str
    lr: float | None


def _counted_params(cfg: SweepConfig, width: int) -> tuple[float, float]:
    """(N, N_v) of the base config at `width`, from the repo's accounting (exact, no model built)."""
    from pretrain.accounting import param_counts
    from pretrain.config import load_config

    extra = [e for e in cfg.extra if e.split("=", 1)[0].startswith("model.")]
    model_cfg = load_config(cfg.base_config, [*extra, f"model.width={int(width)}"]).model
    counts = param_counts(model_cfg)
    return float(counts.decoder_params), float(counts.vision_params)


def _base_lr(config: str, extra: list) -> float:
    """The learning rate a run of `config` trains with (nan only if the config does not exist yet,
    which tools/sweep.py reports)."""
    from pretrain.config import load_config

    if not os.path.isfile(config):
        return float("nan")
    train = [e for e in extra if e.split("=", 1)[0].strip() == "train.lr"]
    return float(load_config(config, train).train.lr)


def _sizes(cfg: SweepConfig):
    """(preset-like, N, N_v, model overrides) per model size of the sweep."""
    if cfg.widths:
        if not cfg.base_config:
            raise ValueError("--widths needs --base-config (the presets fix their own widths)")
        params = list(cfg.params) or [_counted_params(cfg, w) for w in cfg.widths]
        if len(params) != len(cfg.widths):
            raise ValueError("give one --params value per width")
        return [(_Size(f"w{w}", None), float(n[0] if isinstance(n, tuple) else n),
                 float(n[1] if isinstance(n, tuple) else 0.0), {"model.width": int(w)})
                for w, n in zip(cfg.widths, params)]
    out = []
    for name in cfg.presets:
        p = get_preset(cfg.kind, name)
        out.append((p, p.decoder_params, p.vision_params, {}))
    return out


def plan_sweep(cfg: SweepConfig) -> list[SweepRun]:
    """The runs of a sweep (no files written)."""
    if cfg.kind not in ("early", "late", "moe"):
        raise ValueError(f"kind must be early, late or moe, got {cfg.kind!r}")
    if not cfg.tokens and not cfg.flops:
        raise ValueError("give token budgets or FLOP budgets")
    tokens_per_step = cfg.global_batch_size * cfg.seq_len
    runs = []
    for size in _sizes(cfg):
        p, N, N_v, size_overrides = size
        budgets = [("D", t) for t in cfg.tokens] + [("C", c) for c in cfg.flops]
        for what, amount in budgets:
            if what == "D":
                D_target = amount
            elif not N > 0:
                raise ValueError("FLOP budgets need parameter counts: give --params with --widths")
            else:
                D_target = amount / (6.0 * (N + cfg.dv_ratio * N_v))
            steps = max(1, round(D_target / tokens_per_step))
            D = float(steps * tokens_per_step)
            C = 6.0 * (N * D + N_v * cfg.dv_ratio * D)   # NaN when N is unknown (widths, no --params)
            label = f"D{format_amount(amount)}" if what == "D" else f"C{amount:.3g}".replace("+", "")
            name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{cfg.kind}_{p.name}_{label}")
            run_dir = os.path.join(cfg.runs_root, cfg.name, name)
            lr = cfg.lr if cfg.lr is not None else p.lr
            w, w_note = warmup_plan(steps, cfg.kind, cfg.cooldown_fraction)
            flat = {"run.name": name, "run.dir": run_dir, **size_overrides, "train.max_steps": steps,
                    "train.warmup_steps": w}
            if lr is not None:        # widths without --lr: keep the base config's
                flat["train.lr"] = lr
            flat.update({"train.cooldown_fraction": cfg.cooldown_fraction,
                         "train.global_batch_size": cfg.global_batch_size, "data.seq_len": cfg.seq_len})
            for kv in cfg.extra:
                k, _, v = kv.partition("=")
                if not _:
                    raise ValueError(f"extra override {kv!r} is not key=value")
                flat[k.strip()] = _parse_value(v)
            nested: dict = {}
            for k, v in flat.items():
                _set_nested(nested, k, v)
            config = cfg.base_config or p.config_path(cfg.config_dir)
            if lr is None:  # widths without --lr: the base config's (with --set overrides)
                lr = _base_lr(config, cfg.extra)
            command = f"CONFIG={shlex.quote(config)} ./launch.sh " + " ".join(
                shlex.quote(f"{k}={_format_value(v)}") for k, v in flat.items())
            runs.append(SweepRun(name=name, kind=cfg.kind, preset=p.name, config=config, run_dir=run_dir, N=N,
                                 N_v=N_v, D=D, C=C, steps=steps, warmup_steps=w, warmup_note=w_note, lr=lr,
                                 cooldown_fraction=cfg.cooldown_fraction,
                                 global_batch_size=cfg.global_batch_size, seq_len=cfg.seq_len,
                                 overrides=nested, command=command))
    return runs


MANIFEST_FIELDS = ("name", "kind", "preset", "config", "run_dir", "N", "N_v", "D", "C", "steps",
                   "warmup_steps", "warmup_note", "lr", "cooldown_fraction", "global_batch_size", "seq_len")


def write_sweep(runs: list[SweepRun], out_dir: str) -> dict:
    """Write overrides/<run>.yaml, commands.sh, manifest.csv and manifest.json; return their paths."""
    os.makedirs(os.path.join(out_dir, "overrides"), exist_ok=True)
    for r in runs:
        with open(os.path.join(out_dir, "overrides", f"{r.name}.yaml"), "w") as f:
            f.write(f"# overrides of {r.config} for run {r.name}\n# launch: {r.command}\n")
            yaml.safe_dump(r.overrides, f, sort_keys=False)
    commands = os.path.join(out_dir, "commands.sh")
    with open(commands, "w") as f:
        f.write("#!/usr/bin/env bash\n# One training run per line; run from the repository root.\nset -e\n")
        for r in runs:
            f.write(r.command + "\n")
    os.chmod(commands, 0o755)
    with open(os.path.join(out_dir, "manifest.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=MANIFEST_FIELDS)
        w.writeheader()
        for r in runs:
            w.writerow({k: getattr(r, k) for k in MANIFEST_FIELDS})
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump([asdict(r) for r in runs], f, indent=2)
    return {"commands": commands, "manifest_csv": os.path.join(out_dir, "manifest.csv"),
            "manifest_json": os.path.join(out_dir, "manifest.json"),
            "overrides": os.path.join(out_dir, "overrides")}
