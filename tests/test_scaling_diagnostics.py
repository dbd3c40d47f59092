"""Honest fits (pretrain/scaling/diagnostics.py): a degenerate fit warns, in the analysis, on the
console and in report.md; a well-posed synthetic fit does not. Plus the loss-axis tick labels."""
import numpy as np
import pytest

from pretrain.scaling.analysis import AnalysisConfig, analyse
from pretrain.scaling.diagnostics import fit_warnings
from pretrain.scaling.fit import FitConfig
from pretrain.scaling.law import ScalingLaw
from pretrain.scaling.plots import loss_tick_labels
from pretrain.scaling.report import report_markdown

LAW = ScalingLaw(E=1.9, A=400.0, B=2500.0, alpha=0.3, beta=0.34)  # inside the start grid


def _rows(N_list, D_list, noise, seed):
    rng = np.random.default_rng(seed)
    return [{"N": float(N), "D": float(D), "kind": "early",
             "loss": float(LAW.predict(N, D) * np.exp(rng.normal(0, noise)))}
            for N in N_list for D in D_list]


def test_the_reported_degenerate_fit_warns():
    """The fit from six tiny demo runs (E = 3e-112, beta = 36.7, B = 7e154)."""
    fit = {"E": 3e-112, "A": 12.0, "B": 7e154, "alpha": 0.4, "beta": 36.7}
    N = np.array([1.1e5, 1.1e5, 2.0e5, 2.0e5, 3.4e5, 3.4e5])
    D = np.array([4e4, 8e4, 4e4, 8e4, 4e4, 8e4])
    w = " | ".join(fit_warnings(N, D, fit, FitConfig(), bootstrap={"std": {"beta": 50.0}}))
    for expected in ("only 6 runs", "model sizes N span", "token counts D span", "log E", "log B", "beta = 36.7",
                     "bootstrap std of beta"):
        assert expected in w, expected


def test_fit_on_few_close_runs_warns_everywhere(capsys):
    rows = _rows([1e8, 1.5e8, 2e8], [1e9, 1.3e9], noise=0.01, seed=1)
    analysis = analyse(rows, AnalysisConfig(bootstrap=0, holdout=False, targets=["avg"]))
    res = analysis.get("early")
    text = " | ".join(res.warnings)
    assert "only 6 runs" in text and "model sizes N span 2x" in text and "token counts D span 1.3x" in text
    assert "WARNING early/avg" in capsys.readouterr().err  # on the console
    report = report_markdown(analysis, [])
    assert "## Warnings" in report and "only 6 runs" in report


def test_well_posed_synthetic_fit_does_not_warn():
    rows = _rows(np.geomspace(1e8, 3e9, 5), np.geomspace(2e9, 2e11, 5), noise=0.001, seed=2)
    analysis = analyse(rows, AnalysisConfig(bootstrap=10, holdout=False, targets=["avg"]))
    res = analysis.get("early")
    assert res.fit["alpha"] == pytest.approx(LAW.alpha, rel=0.2)  # the fit found the law...
    assert res.warnings == []  # ...and says nothing against it
    assert "## Warnings" not in report_markdown(analysis, [])


@pytest.mark.parametrize("lo,hi", [(1.501, 1.515), (2.0, 3.5), (0.41, 0.4102), (3.0, 3.0)])
def test_loss_tick_labels_are_distinct_and_inside_the_range(lo, hi):
    ticks, labels = loss_tick_labels(lo, hi)
    assert len(ticks) >= 2 and len(set(labels)) == len(labels)
    assert all(min(lo, hi) * 0.97 <= t <= max(lo, hi) * 1.03 for t in ticks)
    assert all(abs(float(lab) - t) <= 0.5 * min(b - a for a, b in zip(ticks, ticks[1:])) for lab, t in zip(labels, ticks))
