"""Expert-specialisation scores on routing counts (Shukor et al. 2025, §4.4, appendix E.2): pure numpy.

`counts[..., e, m]` is the number of tokens of modality m (TEXT = 0, IMAGE = 1) routed to expert e.
The paper's score per layer is the unweighted mean over the experts that received tokens of
1 − H(p_e), H the binary entropy in bits and p_e the share of expert e's tokens that are image
patches. The reasons behind each choice (raw vs frequency-normalised share, unweighted mean) are
written down in pretrain/scaling/specialization.py, which reports all of these scores.

This module sits below both users: the MoE layer logs `specialization_score` while training
(`pretrain.models.moe.moe_metrics`, moe/specialization) and the analysis layer
(`pretrain.scaling.specialization`, tools/expert_specialization.py) reports it for a checkpoint,
so both compute the same number and the model never imports the analysis code.

    from pretrain.expert_scores import specialization_score
    specialization_score(counts_LE2)   # [L] scores for [L, E, 2] counts
"""
from __future__ import annotations

import numpy as np

TEXT, IMAGE = 0, 1


def binary_entropy(p) -> np.ndarray:
    """H(p) = −p log2 p − (1 − p) log2(1 − p) in bits, with 0 log 0 = 0; NaN stays NaN."""
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(np.where(p > 0, p * np.log2(np.where(p > 0, p, 1.0)), 0.0)
              + np.where(p < 1, (1 - p) * np.log2(np.where(p < 1, 1 - p, 1.0)), 0.0))
    return np.where(np.isnan(p), np.nan, h)


def image_share(counts) -> np.ndarray:
    """[..., E, 2] counts -> [..., E] share of each expert's tokens that are image tokens
    (NaN for an expert without tokens)."""
    c = np.asarray(counts, dtype=np.float64)
    tot = c.sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(tot > 0, c[..., IMAGE] / np.where(tot > 0, tot, 1.0), np.nan)


def balanced_image_share(counts) -> np.ndarray:
    """[..., E, 2] -> [..., E]: the image share after weighting each modality by 1/its total in the
    layer, (i_e/I) / (i_e/I + t_e/T). NaN where the expert has no tokens or a modality is absent."""
    c = np.asarray(counts, dtype=np.float64)
    tot_m = c.sum(-2, keepdims=True)  # [..., 1, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        f = np.where(tot_m > 0, c / np.where(tot_m > 0, tot_m, 1.0), np.nan)  # fraction of modality m
        s = f.sum(-1)
        return np.where(s > 0, f[..., IMAGE] / np.where(s > 0, s, 1.0), np.nan)


def _mean_over_experts(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    ok = ~np.isnan(x)
    n = ok.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.where(ok, x, 0.0).sum(-1) / np.maximum(n, 1), np.nan)


def specialization_score(counts, normalize: str = "none") -> np.ndarray:
    """Per layer, the unweighted mean over experts (with tokens) of 1 − H(p_e) (paper §4.4).

    counts: [..., E, 2] (text, image) tokens per expert; a [L, E, 2] array gives [L] scores.
    normalize: "none" -> p_e is the raw image share of the expert's tokens (the paper's score);
    "modality" -> p_e normalised by the modality frequencies (`balanced_image_share`)."""
    if normalize == "none":
        p = image_share(counts)
    elif normalize == "modality":
        p = balanced_image_share(counts)
    else:
        raise ValueError(f"normalize must be 'none' or 'modality', got {normalize!r}")
    return _mean_over_experts(1.0 - binary_entropy(p))


def load_weighted_score(counts) -> np.ndarray:
    """Per layer, Σ_e load_e (1 − H(p_e)), load_e the expert's share of the layer's tokens: not the
    paper's (unweighted) mean, but robust to experts that received only a handful of tokens."""
    c = np.asarray(counts, dtype=np.float64)
    tot = c.sum(-1)
    w = tot / np.where(tot.sum(-1, keepdims=True) > 0, tot.sum(-1, keepdims=True), np.nan)
    return np.nansum(w * (1.0 - binary_entropy(image_share(c))), -1) + np.where(tot.sum(-1) > 0, 0.0, np.nan)


def uniform_deviation_score(counts) -> np.ndarray:
    """Appendix E.2's alternative: per layer, mean over experts and modalities of
    |count[e, m] / total[m] − 1/E| (modalities absent from the data are skipped)."""
    c = np.asarray(counts, dtype=np.float64)
    E = c.shape[-2]
    tot_m = c.sum(-2, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        f = np.where(tot_m > 0, c / np.where(tot_m > 0, tot_m, 1.0), np.nan)
    dev = np.abs(f - 1.0 / E)  # [..., E, 2]
    return _mean_over_experts(dev.reshape(*dev.shape[:-2], -1))
