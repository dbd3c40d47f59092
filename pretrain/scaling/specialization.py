"""Expert specialisation of a sparse early-fusion model (Shukor et al. 2025, §4.4, appendix E.2;
Figures 12, 13 and 25): how many text and image tokens each expert of each MoE layer receives,
and how modality-specific the experts of a layer are.

    from pretrain.scaling.specialization import analyse_checkpoint, write_outputs
    result = analyse_checkpoint("runs/demo_moe", data_root="data/demo", batches=8)
    write_outputs(result, "runs/demo_moe/specialization")   # JSON + two PNGs

Command line: `tools/expert_specialization.py`. Tests: `tests/test_expert_specialization.py`.

Counts
------
`counts[l, e, m]` is the number of tokens of modality m (0 = text, 1 = image patch) that the router
of MoE layer l (counted from the input side, as `moe.moe_layers` orders them) sends to global
expert e, over held-out batches of one data source. With top-k > 1 a token counts once for each of
its k experts (the counts are token-expert assignments, as in `MoEFFN.last_counts_E2`). Text means
every non-patch position, `<boi>`/`<eoi>` markers included; padding positions (the pad id outside
image spans, as in `pretrain.data.stats`) are left out by default: the router sees them, but they
are neither text nor image and the demo's eval batches end in all-padding rows.
The routes are recomputed from each `MoEFFN`'s input with `moe.route` in a forward pre-hook (the
same fp32 computation the layer does next), so the MoE module needs no extra hook; the test checks
that with padding included the counts equal the layer's own `last_counts_E2`.

The score (our reading of the paper, written down)
--------------------------------------------------
§4.4: "the average, across all experts within a layer, of 1 − H(p), where H is the binary entropy
of each expert's text/image token distribution". We take:
- p_e = image_e / (text_e + image_e): the share of expert e's tokens that are image patches, the
  raw share, NOT normalised by how frequent each modality is in the data. Evidence: Figure 12's
  caption says HQITP "has a more imbalanced image-to-text token distribution, resulting in
  generally higher specialization", which is what the raw share does (a source of 90 % image
  tokens gives even a random router p ≈ 0.9, 1 − H ≈ 0.53) and what a frequency-normalised share
  would remove. This is `score` (also what `moe.moe_metrics` logs as moe/specialization, averaged
  over layers).
- H in bits (log base 2), so 1 − H(p) lies in [0, 1]: 1 for an expert that only sees one
  modality, 0 for an expert whose tokens are half text, half image.
- The mean over experts is unweighted ("average across all experts"), not weighted by load.
  Experts that received no token in the evaluated data have no distribution and are left out of
  the mean (they are reported, with p = null, in the JSON); a layer none of whose experts got
  tokens has score NaN (null in JSON).
Also reported, because the raw score mixes routing with the data's modality mix:
- `score_balanced`: the same with p normalised by the modality frequencies of the evaluated
  tokens, p'_e = (image_e / I) / (image_e / I + text_e / T) (I, T the layer's image and text
  totals): 0 for an expert that takes each modality in proportion to the data, 1 for a unimodal
  expert. A router that ignores modality scores 0 here whatever the mix. Undefined (NaN) when the
  data hold only one modality (e.g. the text-only source).
- `score_uniform_deviation`: appendix E.2's other definition, "the average difference between the
  number of text/images tokens assigned to each expert and a uniform assignment (1/E)", read as
  mean over experts and the two modalities of |f_{m,e} − 1/E|, f_{m,e} = count_{e,m} / total_m
  (the fraction of modality m's tokens going to expert e). 0 for uniform routing; not bounded by 1.
- `score_load_weighted`: Σ_e load_e (1 − H(p_e)). Not the paper's number; with few evaluated
  tokens (or a poorly balanced router) an expert that got two tokens scores 1 − H(p) = 1 and
  weighs as much as a busy one in the unweighted mean: this variant shows how much that matters.
A text-only source has p = 0 for every expert, so its raw score is trivially 1: it is computed
and written to the JSON but not drawn; the pooled result "all" sums the counts of every evaluated
source (an equal number of batches per source, not the training mixture).

Figures
-------
- `expert_image_share.png` (Figure 13 / 25): per source with both modalities and for the pool, a
  heat map of layers (rows, input side at the top) × experts (columns) coloured by the image
  share p_e; within each layer the experts are sorted by p_e ("experts are ordered for better
  visualization") and each cell is labelled with its expert id and its share of the layer's load.
- `specialization_score.png` (Figure 12): score against layer, one line per source (solid: raw
  score; dashed, same colour: the frequency-normalised one).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

# The scores on counts live below both the model (which logs them) and this analysis layer;
# re-exported here, where the analysis API has always offered them.
from pretrain.expert_scores import (IMAGE, TEXT, balanced_image_share, binary_entropy,  # noqa: F401
                                    image_share, load_weighted_score, specialization_score,
                                    uniform_deviation_score)


# -- counting on a model ------------------------------------------------------------------------

def _moe_layers(model):
    from pretrain.models.moe import moe_layers
    return moe_layers(model)


def collect_expert_counts(model, batches: Iterable, device=None, pad_id: Optional[int] = None,
                          dtype=None) -> np.ndarray:
    """Run `model` (eval mode, no grad) over PackedBatch `batches`; returns int64 counts
    [L, E, 2] (text, image) of token-expert assignments per MoE layer and global expert.

    pad_id: positions holding it outside image spans are not counted (None: count every position,
    which reproduces `MoEFFN.last_counts_E2`). The model must hold every expert (no expert
    parallelism): build it with `build_model(cfg)` and load `consolidated_state_dict`."""
    import torch
    from pretrain.models.moe import route

    layers = _moe_layers(model)
    if not layers:
        raise ValueError("the model has no MoE layers (model.kind must be 'moe'): nothing to analyse")
    for m in layers:
        if m.ep_size != 1:
            raise ValueError("collect_expert_counts needs every expert on one process (expert_group=None)")
    if device is None:
        device = next(model.parameters()).device
    E = layers[0].num_experts
    counts = [torch.zeros(m.num_experts * 2, dtype=torch.long, device=device) for m in layers]
    state = {"valid_T": None}

    def make_hook(l):
        def hook(module, args):
            x_BTD, is_patch_BT = args[0], (args[1] if len(args) > 1 else None)
            _, _, _, ids_TK = route(x_BTD.reshape(-1, x_BTD.shape[-1]), module.router.weight, module.top_k)
            img_T = (torch.zeros(ids_TK.shape[0], dtype=torch.long, device=ids_TK.device)
                     if is_patch_BT is None else is_patch_BT.reshape(-1).long())
            code_TK = ids_TK * 2 + img_T[:, None]
            if state["valid_T"] is not None:
                code_TK = code_TK[state["valid_T"]]
            code_N = code_TK.reshape(-1)
            counts[l].index_add_(0, code_N, torch.ones_like(code_N))
        return hook

    handles = [m.register_forward_pre_hook(make_hook(l)) for l, m in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                batch = batch.to(device)
                if pad_id is not None:
                    state["valid_T"] = (~((batch.tokens == pad_id) & ~batch.is_patch)).reshape(-1)
                if dtype is not None and batch.patches.is_floating_point():
                    batch = batch.with_patches(batch.patches.to(dtype))
                model(batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = torch.stack(counts).view(len(layers), E, 2)
    return out.cpu().numpy().astype(np.int64)


# -- results --------------------------------------------------------------------------------------

@dataclass
class SourceSpecialization:
    """Counts [L, E, 2] on one data source and everything derived from them."""
    name: str
    counts: np.ndarray
    batches: int = 0

    @property
    def n_layers(self) -> int:
        return int(self.counts.shape[0])

    @property
    def n_experts(self) -> int:
        return int(self.counts.shape[1])

    @property
    def has_both_modalities(self) -> bool:
        tot = self.counts.sum((0, 1))
        return bool(tot[TEXT] > 0 and tot[IMAGE] > 0)

    def image_share(self) -> np.ndarray:
        return image_share(self.counts)

    def load(self) -> np.ndarray:
        """[L, E] fraction of each layer's assignments routed to each expert."""
        tot = self.counts.sum(-1).astype(np.float64)
        return tot / np.maximum(tot.sum(-1, keepdims=True), 1)

    def score(self) -> np.ndarray:
        return specialization_score(self.counts)

    def score_balanced(self) -> np.ndarray:
        return specialization_score(self.counts, normalize="modality")

    def score_uniform_deviation(self) -> np.ndarray:
        return uniform_deviation_score(self.counts)

    def score_load_weighted(self) -> np.ndarray:
        return load_weighted_score(self.counts)

    def to_dict(self) -> dict:
        tot = self.counts.sum((0, 1)) / max(self.n_layers, 1)
        n_tok = max(float(tot.sum()), 1.0)
        return {
            "batches": self.batches,
            "tokens_per_layer": {"text": int(tot[TEXT]), "image": int(tot[IMAGE])},
            "image_token_fraction": _num(float(tot[IMAGE]) / n_tok),
            "score_mean": _num(np.nanmean(self.score()) if np.isfinite(self.score()).any() else np.nan),
            "score": _nums(self.score()),
            "score_balanced": _nums(self.score_balanced()),
            "score_uniform_deviation": _nums(self.score_uniform_deviation()),
            "score_load_weighted": _nums(self.score_load_weighted()),
            "counts": {"text": self.counts[..., TEXT].tolist(), "image": self.counts[..., IMAGE].tolist()},
            "image_share": [_nums(r) for r in self.image_share()],
            "load": [_nums(r) for r in self.load()],
        }


def _num(x):
    x = float(x)
    return None if math.isnan(x) else round(x, 6)


def _nums(xs) -> list:
    return [_num(x) for x in np.asarray(xs).ravel()]


@dataclass
class SpecializationResult:
    sources: dict[str, SourceSpecialization]
    meta: dict = field(default_factory=dict)

    def pooled(self) -> SourceSpecialization:
        srcs = list(self.sources.values())
        return SourceSpecialization("all", sum(s.counts for s in srcs), sum(s.batches for s in srcs))

    def all_sources(self) -> dict[str, SourceSpecialization]:
        """Every evaluated source, plus "all" (their pooled counts) when there are several."""
        out = dict(self.sources)
        if len(self.sources) > 1:
            out["all"] = self.pooled()
        return out

    def to_dict(self) -> dict:
        first = next(iter(self.sources.values()))
        return {
            **self.meta,
            "n_layers": first.n_layers,
            "n_experts": first.n_experts,
            "definition": {
                "counts": "counts.text/image[layer][expert]: token-expert assignments on held-out batches, "
                          "padding excluded, <boi>/<eoi> counted as text",
                "image_share": "p = image / (text + image) of the expert's tokens (null: no tokens)",
                "score": "per layer, unweighted mean over experts with tokens of 1 - H(p), H binary entropy "
                         "in bits (paper section 4.4; raw share, not normalised by modality frequency)",
                "score_balanced": "same with p normalised by the layer's modality totals: "
                                  "(i/I) / (i/I + t/T); null when a modality is absent",
                "score_uniform_deviation": "appendix E.2: mean over experts and modalities of "
                                           "|count[e,m] / total[m] - 1/E|",
                "score_load_weighted": "sum over experts of load * (1 - H(p)) (not the paper's; robust to "
                                       "experts with few tokens)",
                "load": "fraction of the layer's assignments routed to each expert",
            },
            "sources": {k: v.to_dict() for k, v in self.all_sources().items()},
        }


def analyse_batches(model, eval_sets: dict[str, list], device=None, pad_id: Optional[int] = None,
                    dtype=None, meta: Optional[dict] = None) -> SpecializationResult:
    """Counts and scores per source, from {source: [PackedBatch, ...]}."""
    sources = {name: SourceSpecialization(name, collect_expert_counts(model, batches, device, pad_id, dtype),
                                          len(batches))
               for name, batches in eval_sets.items() if batches}
    if not sources:
        raise ValueError("no evaluation batches")
    return SpecializationResult(sources, dict(meta or {}))


# -- checkpoints ----------------------------------------------------------------------------------

def resolve_checkpoint(path) -> tuple[Path, Optional[Path]]:
    """A run directory, its `checkpoints/` directory, or one tag directory ->
    (tag directory, run directory or None). A run directory gives its newest COMPLETE checkpoint."""
    from pretrain.checkpoint import COMPLETE, complete_checkpoints

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: not a directory (give a run directory or a checkpoint tag directory)")
    if (p / "mp_rank_00_model_states.pt").is_file():  # a tag directory
        if not (p / COMPLETE).is_file():
            print(f"[specialization] warning: {p} has no {COMPLETE} marker (an interrupted save?)", flush=True)
        run = p.parent.parent
        return p, (run if (run / "config.yaml").is_file() else None)
    for root, run in ((p / "checkpoints", p), (p, p.parent)):
        done = complete_checkpoints(root)
        if done:
            return done[-1], (run if (run / "config.yaml").is_file() else None)
    raise FileNotFoundError(f"{p}: no complete checkpoint (expected {p}/checkpoints/step_*/{COMPLETE} "
                            f"or a tag directory with mp_rank_00_model_states.pt)")


def load_run_config(run_dir: Optional[Path], config: Optional[str] = None, overrides: Iterable[str] = ()):
    """The run's resolved config.yaml (or `config` when given), with dotted overrides."""
    from pretrain.config import load_config

    path = Path(config) if config else (run_dir / "config.yaml" if run_dir else None)
    if path is None or not path.is_file():
        raise FileNotFoundError("no config: the checkpoint is not inside a run directory with config.yaml; "
                                "pass --config")
    return load_config(path, list(overrides))


def load_moe_model(tag_dir, model_cfg, device="cpu", dtype=None):
    """The plain `build_model(cfg)` MoE with every expert, loaded (strict) from a DeepSpeed tag
    directory saved at any expert-parallel size (`moe_parallel.consolidated_state_dict`)."""
    import copy

    from pretrain.models import build_model
    from pretrain.models.moe_parallel import consolidated_state_dict

    if model_cfg.kind != "moe":
        raise ValueError(f"model.kind={model_cfg.kind!r}: expert specialisation needs an MoE model (kind 'moe')")
    cfg = copy.deepcopy(model_cfg)
    cfg.moe.expert_parallel_size = 1  # one process holds all experts
    model = build_model(cfg)
    model.load_state_dict(consolidated_state_dict(str(tag_dir)), strict=True)
    model.to(device=device, dtype=dtype)
    model.eval()
    return model


def analyse_checkpoint(checkpoint, data_root: Optional[str] = None, config: Optional[str] = None,
                       overrides: Iterable[str] = (), sources: Optional[list[str]] = None,
                       batches: Optional[int] = None, micro_batch_size: Optional[int] = None,
                       device: Optional[str] = None, dtype: Optional[str] = None,
                       include_padding: bool = False) -> SpecializationResult:
    """Load a run's (or tag directory's) MoE checkpoint and its config, build the held-out batches
    of each source (`build_eval_batches`, rank 0 of 1) and count routes per source.

    batches: micro-batches per source (default: the run's train.eval_batches);
    micro_batch_size: rows per batch (default: the run's train.micro_batch_size)."""
    import torch

    from pretrain.data.loader import build_eval_batches, load_tokenizer
    from pretrain.data.shards import load_manifest

    tag_dir, run_dir = resolve_checkpoint(checkpoint)
    ov = list(overrides) + ([f"data.root={data_root}"] if data_root else [])
    cfg = load_run_config(run_dir, config, ov)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tdtype = {None: None, "fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model = load_moe_model(tag_dir, cfg.model, dev, tdtype)
    n_batches = batches or cfg.train.eval_batches
    mbs = micro_batch_size or cfg.train.micro_batch_size
    manifest = load_manifest(cfg.data.root)
    wanted = sources or list(cfg.data.sources)
    unknown = [s for s in wanted if s not in cfg.data.sources]
    if unknown:
        raise ValueError(f"sources {unknown} are not in the run's data.sources {cfg.data.sources}")
    eval_sets, skipped = {}, []
    for s in wanted:
        if not manifest.select(s, "val"):
            skipped.append(s)
            continue
        eval_sets[s] = build_eval_batches(cfg.data, s, rank=0, world_size=1, micro_batch_size=mbs,
                                          max_batches=n_batches)
    pad_id = None if include_padding else load_tokenizer(cfg.data).pad_id
    step = None
    if (tag_dir / "COMPLETE").is_file():
        first = (tag_dir / "COMPLETE").read_text().split()
        step = int(first[1]) if len(first) > 1 and first[0] == "step" else None
    meta = {"checkpoint": str(tag_dir), "run_dir": str(run_dir) if run_dir else None, "step": step,
            "data_root": str(cfg.data.root), "num_experts": cfg.model.moe.num_experts,
            "top_k": cfg.model.moe.top_k, "batches_per_source": n_batches, "micro_batch_size": mbs,
            "seq_len": cfg.data.seq_len, "padding_counted": include_padding,
            "sources_without_val_split": skipped}
    return analyse_batches(model, eval_sets, dev, pad_id, tdtype, meta)


# -- outputs --------------------------------------------------------------------------------------

def _plotted_sources(result: SpecializationResult) -> dict[str, SourceSpecialization]:
    """Sources whose raw score means something: both modalities present (text-only is trivially 1)."""
    return {k: v for k, v in result.all_sources().items() if v.has_both_modalities}


def plot_image_share(result: SpecializationResult, path, sort_experts: bool = True) -> Optional[str]:
    """Figure 13: layers x experts heat map of the image share, one panel per source with both
    modalities (and the pool). Returns the path, or None when no source has images."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _plotted_sources(result)
    if not panels:
        return None
    n = len(panels)
    first = next(iter(panels.values()))
    L, E = first.n_layers, first.n_experts
    fig, axes = plt.subplots(1, n, figsize=(max(3.0, 0.55 * E + 1.2) * n + 1.0, 0.45 * L + 2.0), squeeze=False,
                             layout="constrained")
    cmap = plt.get_cmap("coolwarm").with_extremes(bad="lightgrey")  # grey: expert got no token
    im = None
    for ax, (name, src) in zip(axes[0], panels.items()):
        share, load = src.image_share(), src.load()
        order = (np.argsort(np.where(np.isnan(share), 2.0, share), axis=1, kind="stable") if sort_experts
                 else np.tile(np.arange(E), (L, 1)))
        shown = np.take_along_axis(share, order, 1)
        im = ax.imshow(np.ma.masked_invalid(shown), cmap=cmap, vmin=0, vmax=1, aspect="auto",
                       interpolation="nearest")
        if L * E <= 400:
            for l in range(L):
                for j in range(E):
                    e = order[l, j]
                    pct = 100 * load[l, e]
                    pct_s = "<1%" if 0 < pct < 0.5 else f"{pct:.0f}%"
                    ax.text(j, l, f"e{e}\n{pct_s}", ha="center", va="center", fontsize=6.5, color="black")
        ax.set_yticks(range(L), [str(l + 1) for l in range(L)])
        ax.set_xticks(range(E), [str(j + 1) for j in range(E)] if sort_experts else [f"e{j}" for j in range(E)])
        ax.set_xlabel("expert (sorted by image share)" if sort_experts else "expert")
        ax.set_ylabel("layer")
        frac = src.to_dict()["image_token_fraction"]
        ax.set_title(f"{name} ({100 * frac:.0f}% image tokens)", fontsize=10)
    fig.colorbar(im, ax=axes[0].tolist(), label="image share of the expert's tokens", shrink=0.9, pad=0.01)
    fig.suptitle("Tokens routed to each expert: image share (cell: expert id, share of the layer's load)",
                 fontsize=10)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return str(path)


def plot_scores(result: SpecializationResult, path) -> Optional[str]:
    """Figure 12: specialisation score per layer, one line per source with both modalities
    (solid: 1 − H(raw image share); dashed: modality-frequency-normalised)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _plotted_sources(result)
    if not panels:
        return None
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    colors = plt.get_cmap("tab10")
    for i, (name, src) in enumerate(panels.items()):
        x = np.arange(1, src.n_layers + 1)
        ax.plot(x, src.score(), "-o", color=colors(i), label=f"{name}")
        ax.plot(x, src.score_balanced(), "--", marker=".", color=colors(i), alpha=0.7,
                label=f"{name} (normalised by modality frequency)")
    ax.set_xlabel("layer")
    ax.set_ylabel("specialisation score  mean_e 1 - H(p_e)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks(np.arange(1, next(iter(panels.values())).n_layers + 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("MoE specialisation score per layer", fontsize=10)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return str(path)


def write_outputs(result: SpecializationResult, out_dir, plots: bool = True) -> dict[str, str]:
    """`specialization.json`, `expert_image_share.png`, `specialization_score.png` in out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": str(out / "specialization.json")}
    (out / "specialization.json").write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    if plots:
        for key, fn, name in (("heatmap", plot_image_share, "expert_image_share.png"),
                              ("scores", plot_scores, "specialization_score.png")):
            p = fn(result, out / name)
            if p:
                paths[key] = p
    return paths


def summary_lines(result: SpecializationResult) -> list[str]:
    """One console line per source: score per layer."""
    lines = []
    for name, src in result.all_sources().items():
        d = src.to_dict()
        s = " ".join("-" if v is None else f"{v:.3f}" for v in d["score"])
        lines.append(f"{name:>12}: image tokens {100 * d['image_token_fraction']:5.1f}% | score per layer {s}")
    return lines


__all__ = ["SourceSpecialization", "SpecializationResult", "analyse_batches", "analyse_checkpoint",
           "balanced_image_share", "binary_entropy", "collect_expert_counts", "image_share",
           "load_moe_model", "plot_image_share", "plot_scores", "resolve_checkpoint",
           "specialization_score", "summary_lines", "uniform_deviation_score", "write_outputs"]
