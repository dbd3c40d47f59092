"""The GPU benchmarks run end to end on CPU (`--smoke`: interpreter, tiny shapes, no timings), and
their correctness checks catch a planted error in a gradient.

Run:  .venv/bin/python -m pytest tests/test_bench_tools.py -q
"""
import os

import pytest
import torch

from tools import bench_attention, bench_moe

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("smoke mode needs TRITON_INTERPRET=1 (conftest sets it on CPU machines)", allow_module_level=True)


def _scaled(fn, index, factor):
    """fn with output `index` of its result (or the result itself when index is None) scaled."""
    def wrapped(*a, **k):
        out = fn(*a, **k)
        if index is None:
            return out * factor
        out = list(out)
        out[index] = out[index] * factor
        return tuple(out)
    return wrapped


def test_bench_moe_smoke_checks_pass_and_catch_a_wrong_dw(monkeypatch, capsys):
    assert bench_moe.main(["--smoke", "--routing", "empty", "--gemms", "swiglu"]) == 0
    out = capsys.readouterr().out
    assert "0 failed checks" in out and "| swiglu |" in out and "ours fused swiglu" in out

    from kernels import grouped_gemm as gg
    monkeypatch.setattr(gg, "_launch_grouped_mm_dw", _scaled(gg._launch_grouped_mm_dw, None, 1.01))
    assert bench_moe.main(["--smoke", "--routing", "ep8", "--gemms", "up"]) == 1
    failed = capsys.readouterr().out.split("failed checks:")[1]
    # Only our kernel's weight gradient (input 1) is wrong; the baselines still pass.
    assert "| ours (triton) |" in failed and "FAIL d1" in failed
    assert "torch._grouped_mm" not in failed and "dense matmul" not in failed


def test_bench_attention_smoke_checks_pass_and_catch_a_wrong_dq(monkeypatch, capsys):
    assert bench_attention.main(["--smoke", "--sources", "text", "--dh", "48"]) == 0
    out = capsys.readouterr().out
    assert "0 failed checks" in out and "| ours |" in out and "sdpa_causal" in out

    from kernels import attention_triton as at
    monkeypatch.setattr(at, "attn_backward", _scaled(at.attn_backward, 0, torch.tensor(1.01)))
    assert bench_attention.main(["--smoke", "--sources", "interleaved", "--dh", "16"]) == 1
    failed = capsys.readouterr().out.split("failed checks")[1]
    assert "| ours |" in failed and "FAIL dq" in failed and "sdpa_dense" not in failed
