"""Figures of the analysis, as PNG (matplotlib, Agg backend: no display needed).

* `loss_vs_flops.png` (Figure 2 / 9 / 26): final loss against training FLOPs, one colour per model
  size with the runs of a size joined, the hull power law `L = K C^c` (solid) and the
  compute-optimal loss of the fitted Eq. 1 (dashed); one panel per model kind.
* `observed_vs_predicted.png` (Figure 23): each run's loss against Eq. 1's prediction.
* `optimal_vs_compute.png` (Figure 1, bottom): `N_opt` and `D_opt` against compute, every kind
  on the same axes, with the regression exponents in the legend.
* `frontiers.png` (Figure 1, top): the compute frontiers of every kind on one axis.
* `loss_vs_flops_<source>.png` (Figures 27/28): as `loss_vs_flops.png` for each per-source target
  (caption, interleaved, text) that was fitted.

    from pretrain.scaling.plots import plot_all
    plot_all(analysis, "out/")
"""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .derived import LateFusionFlops, optimal_by_scan  # noqa: E402
from .law import ScalingLaw  # noqa: E402
from .runs import column  # noqa: E402

KIND_LABEL = {"early": "early fusion", "late": "late fusion", "moe": "early fusion MoE",
              "modality_aware": "modality-aware MoE", "all": "runs"}


def _fmt_params(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else (f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}K")


def _size_colors(sizes):
    cmap = plt.get_cmap("viridis")
    return {s: cmap(i / max(1, len(sizes) - 1) * 0.9) for i, s in enumerate(sizes)}


MAX_LEGEND_SIZES = 10


def _draw_runs(fig, ax, N, X, Y, joined: bool, loc: str = "upper right"):
    """Runs coloured by model size: a legend entry per size when there are few, else a colour bar."""
    sizes = sorted(set(N.tolist()))
    if len(sizes) <= MAX_LEGEND_SIZES:
        colors = _size_colors(sizes)
        handles = []
        for s in sizes:
            m = N == s
            o = np.argsort(X[m])
            (h,) = ax.plot(X[m][o], Y[m][o], "o-" if joined else "o", color=colors[s], ms=4, lw=1,
                           label=_fmt_params(s), zorder=3)
            handles.append(h)
        leg = ax.legend(handles=handles, fontsize=7, title="params", title_fontsize=7, loc=loc)
        ax.add_artist(leg)
    else:
        sc = ax.scatter(X, Y, c=np.log10(N), cmap="viridis", s=12, zorder=3)
        fig.colorbar(sc, ax=ax, label="log10 params")


def loss_tick_labels(lo: float, hi: float, n: int = 6) -> tuple[list[float], list[str]]:
    """Ticks and labels for a loss axis over [lo, hi] (usually well under a decade): at least two
    ticks, and as many decimals as it takes for neighbouring labels to differ (a range such as
    1.501-1.515 would otherwise print "1.50" several times)."""
    if not hi > lo:
        lo, hi = lo * 0.99, hi * 1.01 + 1e-12
    ticks = matplotlib.ticker.MaxNLocator(n).tick_values(lo, hi)
    ticks = [float(t) for t in ticks if lo * 0.98 <= t <= hi * 1.02]
    if len(ticks) < 2:
        ticks = [lo, hi]
    step = min(b - a for a, b in zip(ticks, ticks[1:]))
    digits = max(2, int(np.ceil(-np.log10(step))) if step > 0 else 2)
    while len({f"{t:.{digits}f}" for t in ticks}) < len(ticks) and digits < 12:
        digits += 1
    return ticks, [f"{t:.{digits}f}" for t in ticks]


def _loss_ticks(ax, L):
    """Readable ticks on a log loss axis."""
    ticks, labels = loss_tick_labels(float(np.min(L)), float(np.max(L)))
    ax.yaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FixedFormatter(labels))
    ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())


def _law(res) -> ScalingLaw:
    return ScalingLaw(**{k: res.fit[k] for k in ("E", "A", "B", "alpha", "beta")})


def _runs_C(rows):
    N, D, C = column(rows, "N"), column(rows, "D"), column(rows, "C")
    Nv, Dv = column(rows, "N_v", 0.0), column(rows, "D_v", 0.0)
    miss = ~np.isfinite(C)
    C[miss] = 6 * (N[miss] * D[miss] + Nv[miss] * Dv[miss])
    return N, D, C


def _late(rows):
    N, D, _ = _runs_C(rows)
    Nv, Dv = column(rows, "N_v", 0.0), column(rows, "D_v", 0.0)
    return LateFusionFlops.from_runs(N, Nv, D, Dv) if np.any(Nv > 0) and np.any(Dv > 0) else None


def plot_loss_vs_flops(analysis, path: str, target: str = "avg") -> str | None:
    kinds = [k for k in analysis.rows if analysis.get(k, target)]
    if not kinds:
        return None
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.2 * len(kinds), 4.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        res = analysis.get(kind, target)
        rows = analysis.rows[kind]
        N, D, C = _runs_C(rows)
        L = column(rows, "loss" if target == "avg" else f"loss_{target}")
        _draw_runs(fig, ax, N, C, L, joined=True)
        fit_lines = []
        if res.hull:
            h = res.hull
            fit_lines += ax.plot(h["hull_C"], h["hull_L"], "-", color="0.35", lw=0.8, label="lower convex hull")
            Cf = np.geomspace(h["C_min"], h["C_max"], 100)
            fit_lines += ax.plot(Cf, h["K"] * Cf ** h["c"], "k-", lw=2, label=f"L = {h['K']:.3g} C^{h['c']:.4f}")
            if h.get("threshold_used") and analysis.config.min_flops > C.min():
                ax.axvline(analysis.config.min_flops, color="0.6", ls=":", lw=1)
        Cs = np.geomspace(C.min(), C.max(), 200)
        law = _law(res)
        late = _late(rows)
        Nopt, Dopt, _ = optimal_by_scan(law, Cs, late=late)
        ok = Nopt > 0
        fit_lines += ax.plot(Cs[ok], law.predict(Nopt[ok], Dopt[ok]), "--", color="tab:red", lw=1.3,
                             label="Eq. 1 compute-optimal")
        ax.set_xscale("log")
        ax.set_yscale("log")
        _loss_ticks(ax, L)
        ax.set_xlabel("training FLOPs C")
        ax.set_ylabel(f"validation loss ({target})")
        ax.set_title(f"{KIND_LABEL.get(kind, kind)}: α={law.alpha:.3f}, β={law.beta:.3f}")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(handles=fit_lines, fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_observed_vs_predicted(analysis, path: str, target: str = "avg") -> str | None:
    kinds = [k for k in analysis.rows if analysis.get(k, target)]
    if not kinds:
        return None
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.6 * len(kinds), 4.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        res = analysis.get(kind, target)
        rows = analysis.rows[kind]
        N, D, _ = _runs_C(rows)
        L = column(rows, "loss" if target == "avg" else f"loss_{target}")
        P = _law(res).predict(N, D)
        _draw_runs(fig, ax, N, P, L, joined=False, loc="lower right")
        lo, hi = min(L.min(), P.min()), max(L.max(), P.max())
        pad = 0.03 * (hi - lo + 1e-12)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=1)
        m = res.held_in
        ax.set_title(f"{KIND_LABEL.get(kind, kind)}: R²={m['R2']:.4f}, MAE={m['MAE_percent']:.2f}%", fontsize=10)
        ax.set_xlabel("predicted loss (Eq. 1)")
        ax.set_ylabel("observed loss")
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_optimal_vs_compute(analysis, path: str, target: str = "avg") -> str | None:
    kinds = [k for k in analysis.rows if analysis.get(k, target)]
    if not kinds:
        return None
    fig, (ax_n, ax_d) = plt.subplots(1, 2, figsize=(10, 4.2))
    C_all = np.concatenate([_runs_C(analysis.rows[k])[2] for k in kinds])
    Cs = np.geomspace(C_all.min(), C_all.max() * 10, 100)
    for i, kind in enumerate(kinds):
        res = analysis.get(kind, target)
        law = _law(res)
        Nopt, Dopt, _ = optimal_by_scan(law, Cs, late=_late(analysis.rows[kind]))
        ok = Nopt > 0
        reg = res.regression
        color = plt.get_cmap("tab10")(i)
        name = KIND_LABEL.get(kind, kind)
        ax_n.plot(Cs[ok], Nopt[ok], "-", color=color, label=f"{name}: N* ∝ C^{reg['a']:.3f}")
        ax_d.plot(Cs[ok], Dopt[ok], "-", color=color, label=f"{name}: D* ∝ C^{reg['b']:.3f}")
    for ax, what in ((ax_n, "compute-optimal parameters N*"), (ax_d, "compute-optimal tokens D*")):
        _log_axes(ax, what)
        ax.legend(fontsize=8)
    return _save(fig, path)


def _log_axes(ax, ylabel: str) -> None:
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training FLOPs C")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.3)


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_frontiers(analysis, path: str, target: str = "avg") -> str | None:
    """Figure 1 (top): every kind's compute frontier on one axis -- its runs (faint), the hull
    power law `L = K C^c` where it was fitted, else Eq. 1's compute-optimal loss (dashed)."""
    kinds = [k for k in analysis.rows if analysis.get(k, target)]
    if not kinds:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    L_all = []
    for i, kind in enumerate(kinds):
        res, rows = analysis.get(kind, target), analysis.rows[kind]
        color, name = plt.get_cmap("tab10")(i), KIND_LABEL.get(kind, kind)
        N, D, C = _runs_C(rows)
        L = column(rows, "loss" if target == "avg" else f"loss_{target}")
        L_all.append(L)
        ax.plot(C, L, "o", color=color, ms=3, alpha=0.35)
        if res.hull:
            h = res.hull
            Cf = np.geomspace(h["C_min"], h["C_max"], 100)
            ax.plot(Cf, h["K"] * Cf ** h["c"], "-", color=color, lw=2, label=f"{name}: L = {h['K']:.3g} C^{h['c']:.4f}")
        else:
            law = _law(res)
            Cs = np.geomspace(C.min(), C.max(), 100)
            Nopt, Dopt, _ = optimal_by_scan(law, Cs, late=_late(rows))
            ok = Nopt > 0
            ax.plot(Cs[ok], law.predict(Nopt[ok], Dopt[ok]), "--", color=color, lw=1.5,
                    label=f"{name}: Eq. 1 compute-optimal (no hull fit)")
    _log_axes(ax, f"validation loss ({target})")
    _loss_ticks(ax, np.concatenate(L_all))
    ax.set_title("compute frontiers")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_all(analysis, out_dir: str) -> list[str]:
    """The figures above for the `avg` target, plus `loss_vs_flops_<source>.png` for every other
    fitted target (the paper's Figures 27/28: caption, interleaved, text) and `frontiers.png`."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [plot_loss_vs_flops(analysis, os.path.join(out_dir, "loss_vs_flops.png")),
             plot_observed_vs_predicted(analysis, os.path.join(out_dir, "observed_vs_predicted.png")),
             plot_optimal_vs_compute(analysis, os.path.join(out_dir, "optimal_vs_compute.png")),
             plot_frontiers(analysis, os.path.join(out_dir, "frontiers.png"))]
    for target in dict.fromkeys(r.target for r in analysis.results if r.target != "avg"):
        paths.append(plot_loss_vs_flops(analysis, os.path.join(out_dir, f"loss_vs_flops_{target}.png"), target))
    return [p for p in paths if p]
