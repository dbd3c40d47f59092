"""Benchmark (GPU) and check (GPU, or CPU smoke) the MoE grouped GEMM and fused SwiGLU kernels.

What it measures, per MoE preset width (800 ... 3232) with its SwiGLU hidden size (8/3 · width
rounded up to 256) and M token rows:

* the two expert GEMM shapes of a SwiGLU expert, ``up`` (x_MD @ w_EDH) and ``down`` (h_MH @ w_EHD),
  under these routings of the M rows over 8 experts:
  ``balanced`` (M/8 each), ``zipf`` (p_e ∝ 1/(e+1)^1.2), ``empty`` (3 experts get nothing),
  ``onehot`` (every row to one expert), and ``ep8``: the presets' ``expert_parallel_size: 8``,
  where each rank holds ONE local expert and receives about M rows — a grouped GEMM with E = 1,
  which must keep up with one dense cuBLAS matmul of the same shape;
* implementations: ours (``kernels.grouped_gemm``, backend "triton"), a loop of ``torch.matmul``
  (split sizes as Python ints, i.e. without the host read a real loop needs), ``torch._grouped_mm``
  (backend "torch"), DeepSpeed's Triton grouped GEMM (GPU only, when importable), and one dense
  ``[M, K] @ [K, N]`` matmul of the same FLOPs (the roofline; its failure is reported, not fatal);
* ``swiglu``: the fused w1/w3 kernel (``kernels.grouped_swiglu``) against the two-GEMM path;
* forward and forward+backward medians of ``triton.testing.do_bench``; TFLOP/s count 2·M·K·N per
  GEMM (6·M·K·N forward+backward); ``%dense`` is throughput relative to the dense matmul.

Before timing, every implementation's y, dX and dW are checked against an fp32 loop of matmuls on
the same inputs (relative Frobenius error, thresholds in ``TOL``: bf16 1.6e-2, fp16 2e-3, fp32 1e-3).
A failed check marks the row FAIL and the script exits with status 1; a failing optional baseline
(DeepSpeed, ``torch._grouped_mm`` off its fast path) is recorded as an error and is not a failure.

``--smoke`` runs the same code on CPU under TRITON_INTERPRET=1 with tiny shapes in fp32: the checks
run, nothing is timed (times are NaN). tests/test_bench_tools.py uses it, and plants an error in a
gradient to prove the checks fire.

Run:
    python tools/bench_moe.py --quick --md tools/bench_moe_results.md    # the one-shot GPU run
    python tools/bench_moe.py --out bench_moe.json                       # full sweep (long)
    python tools/bench_moe.py --smoke                                    # CPU, seconds, no timings
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.bench_common import make_timer, rel_err  # noqa: E402

PRESET_WIDTHS = (800, 1088, 1632, 2208, 2624, 3232)
TOKEN_COUNTS = (8192, 16384, 32768)
NUM_EXPERTS = 8
ROUTINGS = ("balanced", "zipf", "empty", "onehot", "ep8")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOL = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3, torch.float32: 1e-3}
REQUIRED = ("ours (triton)", "ours fused swiglu")  # an error in these is a failure


def swiglu_hidden(width: int, multiple_of: int = 256) -> int:
    from pretrain.models.config import swiglu_hidden as model_rule  # the presets' own rule
    return model_rule(width, multiple_of)


def routing_counts(M: int, routing: str, zipf_s: float = 1.2, E: int = NUM_EXPERTS) -> torch.Tensor:
    """Rows per expert summing to M (largest-remainder rounding); `ep8` has a single expert."""
    if routing == "ep8":
        return torch.tensor([M])
    p = torch.full((E,), 1.0, dtype=torch.float64)
    if routing == "zipf":
        p = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** zipf_s
    elif routing == "empty":
        p[torch.tensor([1, 4, 6])] = 0.0
    elif routing == "onehot":
        p = torch.zeros(E, dtype=torch.float64)
        p[E // 2] = 1.0
    elif routing != "balanced":
        raise ValueError(f"unknown routing {routing!r}; expected one of {ROUTINGS}")
    exact = p / p.sum() * M
    counts = exact.floor().long()
    short = M - int(counts.sum())
    counts[torch.argsort(exact - counts, descending=True)[:short]] += 1
    return counts


# ── timing ──────────────────────────────────────────────────────────────────────────────────────

def time_fwd_bwd(timer, fn, inputs, dy):
    """(fwd ms, fwd+bwd ms) of fn(*inputs); inputs require grad."""
    def fwd():
        with torch.no_grad():
            fn(*inputs)

    def fwd_bwd():
        fn(*inputs).backward(dy)

    if not getattr(timer, "smoke", False):
        fwd(), fwd_bwd()  # compile / autotune outside the timed region
    return timer(fwd), timer(fwd_bwd, grad_to_none=list(inputs))


def check_grads(fn, inputs, dy, refs, tol) -> dict:
    """Relative errors of fn's output and input gradients against `refs` (fp32), and the verdict."""
    xs = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*xs)
    grads = torch.autograd.grad(y, xs, dy)
    names = ["y"] + [f"d{i}" for i in range(len(xs))]
    errs = {n: rel_err(g, r) for n, g, r in zip(names, [y] + list(grads), refs)}
    worst = max(errs, key=errs.get)
    return dict(errors=errs, check="ok" if errs[worst] < tol else f"FAIL {worst} {errs[worst]:.1e} >= {tol:.0e}")


# ── the grouped GEMM ────────────────────────────────────────────────────────────────────────────

def gemm_impls(counts_E: torch.Tensor, device, smoke: bool) -> dict:
    from kernels.grouped_gemm import grouped_gemm
    counts_dev = counts_E.to(device)
    sizes = counts_E.tolist()
    impls = {"ours (triton)": lambda x, w: grouped_gemm(x, w, counts_dev, backend="triton"),
             "loop torch.matmul": lambda x, w: torch.cat(
                 [xe @ w[e] for e, xe in enumerate(torch.split(x, sizes))], dim=0)}
    if hasattr(torch, "_grouped_mm"):
        impls["torch._grouped_mm"] = lambda x, w: grouped_gemm(x, w, counts_dev, backend="torch")
    if not smoke:
        try:
            from deepspeed.ops.triton_ops import group_gemm_triton
            offs = torch.cumsum(counts_dev, 0).to(torch.int32)
            impls["deepspeed group_gemm_triton"] = lambda x, w: group_gemm_triton(x, w, offs)
        except Exception as e:  # noqa: BLE001 (any import failure just removes the column)
            print(f"[bench_moe] DeepSpeed Triton grouped GEMM unavailable: {type(e).__name__}: {e}")
    return impls


def _reference(fn, inputs, dy):
    """fp32 output and gradients of fn on the same (rounded) inputs."""
    xs = [t.detach().float().requires_grad_() for t in inputs]
    y = fn(*xs)
    return [y.detach()] + [g.detach() for g in torch.autograd.grad(y, xs, dy.float())]


def bench_gemm(M, K, N, counts_E, dtype, device, timer, smoke) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(M + K + N)
    E = len(counts_E)
    x = torch.randn(M, K, device=device, dtype=dtype, generator=gen).requires_grad_()
    w = (torch.randn(E, K, N, device=device, dtype=dtype, generator=gen) / math.sqrt(K)).requires_grad_()
    dy = torch.randn(M, N, device=device, dtype=dtype, generator=gen)
    impls = gemm_impls(counts_E, device, smoke)
    refs = _reference(impls["loop torch.matmul"], (x, w), dy)
    rows = []
    for name, fn in impls.items():
        rows.append(_measure(name, fn, (x, w), dy, refs, TOL[dtype], 2.0 * M * K * N, timer))
    # The dense roofline: M rows through one K x N matrix (cuBLAS); checked like the others.
    w_KN = w.detach()[0].clone().requires_grad_()
    dense_refs = _reference(lambda a, b: a @ b, (x, w_KN), dy)
    dense = _measure("dense matmul (same FLOPs)", lambda a, b: a @ b, (x, w_KN), dy, dense_refs,
                     TOL[dtype], 2.0 * M * K * N, timer)
    rows.append(dense)
    _relative_to(rows, dense)
    return rows


def _measure(name, fn, inputs, dy, refs, tol, flops_fwd, timer) -> dict:
    """Check then time one implementation; any exception becomes the row's `error`."""
    row = {"impl": name}
    try:
        row.update(check_grads(fn, inputs, dy, refs, tol))
        t_fwd, t_fb = time_fwd_bwd(timer, fn, inputs, dy)
        row.update(fwd_ms=t_fwd, fwd_tflops=flops_fwd / (t_fwd * 1e9),
                   fwd_bwd_ms=t_fb, fwd_bwd_tflops=3 * flops_fwd / (t_fb * 1e9))
    except Exception as e:  # noqa: BLE001 (one failing baseline must not end the sweep)
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def _relative_to(rows, base):
    for r in rows:
        if "fwd_tflops" in r and "fwd_tflops" in base:
            r["fwd_vs_dense"] = r["fwd_tflops"] / base["fwd_tflops"]
            r["fwd_bwd_vs_dense"] = r["fwd_bwd_tflops"] / base["fwd_bwd_tflops"]


# ── fused SwiGLU vs the two-GEMM path ───────────────────────────────────────────────────────────

def bench_swiglu(M, D, H, counts_E, dtype, device, timer) -> list[dict]:
    from kernels.grouped_swiglu import grouped_swiglu
    gen = torch.Generator(device=device).manual_seed(M + D)
    E = len(counts_E)
    counts = counts_E.to(device)
    x = torch.randn(M, D, device=device, dtype=dtype, generator=gen).requires_grad_()
    w1, w3 = ((torch.randn(E, D, H, device=device, dtype=dtype, generator=gen) / math.sqrt(D)).requires_grad_()
              for _ in range(2))
    dh = torch.randn(M, H, device=device, dtype=dtype, generator=gen)
    refs = _reference(lambda a, b, c: grouped_swiglu(a, b, c, counts, backend="reference"), (x, w1, w3), dh)
    flops = 4.0 * M * D * H
    rows = [_measure("ours fused swiglu", lambda a, b, c: grouped_swiglu(a, b, c, counts, backend="triton"),
                     (x, w1, w3), dh, refs, TOL[dtype], flops, timer)]
    unfused = {"two triton GEMMs + silu*mul": "triton"}
    if hasattr(torch, "_grouped_mm"):
        unfused["two torch._grouped_mm + silu*mul"] = "torch"
    for name, backend in unfused.items():
        rows.append(_measure(name, lambda a, b, c, be=backend: grouped_swiglu(a, b, c, counts, backend=be),
                             (x, w1, w3), dh, refs, TOL[dtype], flops, timer))
    return rows


# ── hook: the whole MoE layer against the dense FFN ─────────────────────────────────────────────

def moe_layer_vs_dense_ffn(widths, tokens, dtype, device, timer, backend="triton") -> list[dict]:
    """Whole `MoEFFN` (top-1 of 8, router, permute, fused SwiGLU, grouped GEMM, un-permute) vs the
    dense `SwiGLU` with the same active parameters, forward and forward+backward."""
    from pretrain.models.config import MoEConfig
    from pretrain.models.layers import SwiGLU
    from pretrain.models.moe import MoEFFN
    rows = []
    for width in widths:
        hidden = swiglu_hidden(width)
        moe = MoEFFN(width, hidden, MoEConfig(num_experts=NUM_EXPERTS, top_k=1, backend=backend))
        modules = {"moe": moe.to(device=device, dtype=dtype),
                   "dense": SwiGLU(width, hidden).to(device=device, dtype=dtype)}
        for T in tokens:
            x = torch.randn(1, T, width, device=device, dtype=dtype).requires_grad_()
            dy = torch.randn_like(x)
            row = {"width": width, "hidden": hidden, "tokens": T, "backend": backend}
            for name, module in modules.items():
                try:
                    row[f"{name}_fwd_ms"], row[f"{name}_fwd_bwd_ms"] = time_fwd_bwd(timer, module, (x,), dy)
                except Exception as e:  # noqa: BLE001
                    row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            if "moe_fwd_ms" in row and "dense_fwd_ms" in row:
                row["fwd_ratio"] = row["moe_fwd_ms"] / row["dense_fwd_ms"]
                row["fwd_bwd_ratio"] = row["moe_fwd_bwd_ms"] / row["dense_fwd_bwd_ms"]
            rows.append(row)
    return rows


# ── output ──────────────────────────────────────────────────────────────────────────────────────

def environment(device) -> dict:
    import triton
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (interpreter smoke)",
           "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
           "python": platform.python_version(),
           "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if device.type == "cuda":
        env["driver"] = _driver_version()
    return env


def _driver_version():
    try:
        import subprocess
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


HEADER = ("| case | width | M | K | N | routing | impl | fwd ms | fwd TFLOP/s | %dense | fwd+bwd ms | "
          "fwd+bwd TFLOP/s | %dense | max rel err | check |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def format_row(r) -> str:
    pre = f"| {r['case']} | {r['width']} | {r['M']} | {r['K']} | {r['N']} | {r['routing']} | {r['impl']} | "
    if "error" in r:
        return pre + f"error: {r['error'][:100]} | | | | | | | {r.get('check', '')} |"
    f = lambda v, spec: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)  # noqa: E731
    return pre + (f"{f(r['fwd_ms'], '.3f')} | {f(r['fwd_tflops'], '.0f')} | {f(r.get('fwd_vs_dense'), '.0%')} | "
                  f"{f(r['fwd_bwd_ms'], '.3f')} | {f(r['fwd_bwd_tflops'], '.0f')} | "
                  f"{f(r.get('fwd_bwd_vs_dense'), '.0%')} | {max(r['errors'].values()):.1e} | {r['check']} |")


def failures(rows) -> list[dict]:
    return [r for r in rows if r.get("check", "ok") != "ok" or ("error" in r and r["impl"] in REQUIRED)]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=list(PRESET_WIDTHS))
    ap.add_argument("--tokens", type=int, nargs="+", default=list(TOKEN_COUNTS),
                    help="rows M of the grouped GEMM (tokens x top_k)")
    ap.add_argument("--routing", nargs="+", choices=ROUTINGS, default=list(ROUTINGS))
    ap.add_argument("--zipf-s", type=float, default=1.2, help="Zipf exponent of the skewed routing")
    ap.add_argument("--gemms", nargs="+", choices=("up", "down", "swiglu"), default=["up", "down", "swiglu"])
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--no-layer", action="store_true", help="skip the MoE layer vs dense FFN comparison")
    ap.add_argument("--quick", action="store_true",
                    help="the one-shot GPU run: widths 1088 1632 2208, 16384 rows, every routing")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU under TRITON_INTERPRET=1, tiny fp32 shapes, checks only (no timings)")
    ap.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    ap.add_argument("--rep", type=int, default=50, help="do_bench repetition time, ms")
    ap.add_argument("--out", default="bench_moe.json")
    ap.add_argument("--md", default=None, help="also write the markdown table to this path")
    return ap.parse_args(argv)


def run(args) -> list[dict]:
    """Every case of `args`; returns the grouped-GEMM and SwiGLU rows (layer rows in args.layer_rows)."""
    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
    else:
        device, dtype = torch.device("cuda"), DTYPES[args.dtype]
    timer = make_timer(args.smoke, args.warmup, args.rep)
    rows = []
    for width in args.widths:
        hidden = args.smoke_hidden if args.smoke else swiglu_hidden(width)
        for M in args.tokens:
            for routing in args.routing:
                counts_E = routing_counts(M, routing, args.zipf_s)
                for gemm in args.gemms:
                    K, N = (width, hidden) if gemm != "down" else (hidden, width)
                    meta = {"case": gemm, "width": width, "hidden": hidden, "M": M, "K": K, "N": N,
                            "routing": routing, "tokens_per_expert": counts_E.tolist()}
                    new = (bench_swiglu(M, K, N, counts_E, dtype, device, timer) if gemm == "swiglu"
                           else bench_gemm(M, K, N, counts_E, dtype, device, timer, args.smoke))
                    for r in new:
                        rows.append({**meta, **r})
                        print(format_row(rows[-1]), flush=True)
    args.layer_rows = []
    if not args.no_layer and not args.smoke:
        args.layer_rows = moe_layer_vs_dense_ffn(args.widths, args.tokens, dtype, device, timer)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    args.smoke_hidden = 40
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1" and "kernels.grouped_gemm" in sys.modules:
            sys.exit("bench_moe --smoke: kernels were imported without TRITON_INTERPRET=1")
        os.environ["TRITON_INTERPRET"] = "1"
        args.widths, args.tokens, args.no_layer = [24], [37], True
    else:
        if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
            sys.exit("bench_moe.py needs a CUDA GPU and TRITON_INTERPRET unset (use --smoke on CPU: "
                     "checks only, no timings). Nothing was run.")
        if args.quick:
            args.widths, args.tokens = [1088, 1632, 2208], [16384]
    device = torch.device("cpu" if args.smoke else "cuda")
    env = environment(device)
    print(f"# bench_moe | {env} | {args.dtype if not args.smoke else 'fp32 (smoke)'}\n{HEADER}", flush=True)
    rows = run(args)
    bad = failures(rows)
    lines = [f"\n{len(rows)} rows, {len(bad)} failed checks" + ("" if not bad else ":")]
    lines += [format_row(r) for r in bad]
    if args.layer_rows:
        lines += ["", "MoE layer vs dense FFN (same active parameters), ms:", "",
                  "| width | tokens | moe fwd | dense fwd | ratio | moe fwd+bwd | dense fwd+bwd | ratio |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in args.layer_rows:
            lines.append(f"| {r['width']} | {r['tokens']} | {r.get('moe_fwd_ms', float('nan')):.3f} | "
                         f"{r.get('dense_fwd_ms', float('nan')):.3f} | {r.get('fwd_ratio', float('nan')):.2f} | "
                         f"{r.get('moe_fwd_bwd_ms', float('nan')):.3f} | {r.get('dense_fwd_bwd_ms', float('nan')):.3f} | "
                         f"{r.get('fwd_bwd_ratio', float('nan')):.2f} |"
                         + (f" {r.get('moe_error', '')} {r.get('dense_error', '')}" if "moe_error" in r or "dense_error" in r else ""))
    print("\n".join(lines))
    if not args.smoke:
        with open(args.out, "w") as f:
            json.dump({"env": env, "args": {k: v for k, v in vars(args).items() if k != "layer_rows"},
                       "rows": rows, "layer": args.layer_rows}, f, indent=1)
        print(f"[bench_moe] wrote {args.out}")
    if args.md:
        with open(args.md, "w") as f:
            f.write(f"# Grouped GEMM / MoE benchmark\n\n`python tools/bench_moe.py {' '.join(argv or sys.argv[1:])}` "
                    f"on {env['device']} (driver {env.get('driver')}); torch {env['torch']}, CUDA {env['cuda']}, "
                    f"triton {env['triton']}; {env['date_utc']}. Times: median of triton.testing.do_bench.\n\n")
            f.write(HEADER + "\n" + "\n".join(format_row(r) for r in rows) + "\n" + "\n".join(lines) + "\n")
        print(f"[bench_moe] wrote {args.md}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
