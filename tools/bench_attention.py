"""Benchmark (GPU) and check (GPU, or CPU smoke) the packed multimodal attention backends.

Times forward and forward+backward of
  ours         the Triton kernel (kernels/attention_triton.py), ranges precomputed once per batch
  flex         torch FlexAttention with a block mask built once from the same ranges, compiled
               afresh for each case (see below)
  flash_attn   flash-attn varlen causal, one sequence per document (text rows only; optional)
  sdpa_causal  torch SDPA `is_causal=True` over whole rows (text rows only): the speed floor when
               flash-attn is absent. It ignores document boundaries, so it does at least the
               work of per-document causal attention and is not checked against the packed mask
  sdpa_dense   torch SDPA with a dense bool mask (whatever SDPA kernel accepts an arbitrary mask)
in bf16 on rows shaped like the three data sources (kernels/attention_layouts.py: caption rows
with ~3 images of 256 patches per 1k tokens, interleaved rows, text rows), for the head dims the
presets use (32, 64, 80, 96, 128, each with its preset's width: H = width / Dh heads).

FlexAttention compile. One global `torch.compile(flex_attention)` recompiles for every new shape
and grad mode and, past dynamo's recompile limit (8), silently falls back to eager flex, which
would inflate "ours vs flex". Here every new shape starts from `torch._dynamo.reset()` with its
own compiled function (the sources of one shape share it; the recompile limit is raised to 64
besides), and the dynamo counters are read around the timed region: the row records the graphs
compiled and fails its check if any frame was compiled (a recompile) or the recompile limit was
hit while it was timed.

Tile-level work (ours). From `kernels.attention_triton.tile_schedule` with the tiles the kernel
actually launches: the fraction of all T x T tiles each pass visits, and the query-key pairs
inside visited tiles over the allowed pairs (1.0 = no wasted work), forward and dK/dV.

Checks. Before timing, each backend's output and dq, dk, dv on row 0, heads 0..1 (dO is zero
elsewhere) are compared with the fp32 dense reference (relative Frobenius error, `TOL`). A failed
check marks the row FAIL and the script exits with status 1.

TFLOP/s count only allowed query-key pairs: forward 4·pairs·H·Dh, backward 2.5x that.

`--smoke` runs on CPU under TRITON_INTERPRET=1: tiny random layouts, fp32, ours and sdpa_dense,
checks only, no timings (NaN). tests/test_bench_tools.py uses it with a planted error.

Run:
    python tools/bench_attention.py --quick --md tools/bench_attention_results.md   # one-shot GPU run
    python tools/bench_attention.py                         # full grid (long: a flex compile per case)
    python tools/bench_attention.py --sweep-tiles --T 4096 --dh 64 128
    python tools/bench_attention.py --smoke                 # CPU, checks only
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tools.bench_common import make_timer, rel_err  # noqa: E402

SOURCES = ("caption", "interleaved", "text")
# (Dh, width) of the presets (pretrain/configs/paper): H = width / Dh.
PRESET_DH_WIDTH = {32: 3232, 64: 1088, 80: 800, 96: 1632, 128: 2048}
TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}
TILE_SWEEP = [  # (fwd_m, fwd_n, dkdv_m, dkdv_n, dq_m, dq_n, warps, stages, bwd_warps, bwd_stages)
    (128, 64, 64, 128, 128, 64, 8, 3, 8, 3),  # default, Dh <= 64
    (128, 64, 32, 128, 64, 64, 8, 3, 8, 2),  # default, Dh > 64
    (128, 128, 64, 128, 128, 64, 8, 3, 8, 3),
    (128, 64, 32, 128, 128, 32, 4, 3, 4, 3),
    (64, 64, 64, 64, 64, 64, 4, 3, 4, 3),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--T", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--dh", type=int, nargs="+", default=sorted(PRESET_DH_WIDTH))
    p.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    p.add_argument("--backends", nargs="+", default=["ours", "flex", "flash_attn", "sdpa_causal", "sdpa_dense"])
    p.add_argument("--tokens", type=int, default=16384, help="tokens per batch (B = tokens // T)")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="the one-shot GPU run: caption and text rows, T 1024 and 4096, Dh 96 and 128")
    p.add_argument("--smoke", action="store_true", help="CPU under TRITON_INTERPRET=1, checks only")
    p.add_argument("--sweep-tiles", action="store_true", help="also time ours under the TILE_SWEEP configs")
    p.add_argument("--out", default="bench_attention_results.json")
    p.add_argument("--md", default=None, help="also write the markdown table to this path")
    return p.parse_args(argv)


def environment(device) -> dict:
    import triton
    try:
        import flash_attn
        fa = flash_attn.__version__
    except ImportError:
        fa = None
    gpu = device.type == "cuda"
    return dict(device=torch.cuda.get_device_name() if gpu else "CPU (interpreter smoke)",
                capability=list(torch.cuda.get_device_capability()) if gpu else None,
                torch=torch.__version__, cuda=torch.version.cuda, triton=triton.__version__, flash_attn=fa,
                python=platform.python_version(), date_utc=time.strftime("%Y-%m-%d %H:%M", time.gmtime()))


# ── backends ────────────────────────────────────────────────────────────────────────────────────

_flex_compiled: tuple | None = None  # (shape, compiled flex_attention) of the last case


def compiled_flex(shape: tuple):
    """The compiled flex_attention for q of `shape`: a fresh one, after resetting dynamo, whenever
    the shape changes (cases of one shape, i.e. the sources, share it: the block mask is an input)."""
    global _flex_compiled
    if _flex_compiled is None or _flex_compiled[0] != shape:
        from torch.nn.attention.flex_attention import flex_attention
        torch._dynamo.reset()
        _flex_compiled = (shape, torch.compile(flex_attention, dynamic=False))
    return _flex_compiled[1]


def make_backends(names, doc_BT, img_BT, ranges, qkv_shape):
    """name -> callable(q, k, v); per-batch set-up done here, outside the timed region."""
    from kernels.attention import dense_mask, flash_attn_varlen_packed, flex_block_mask, packed_attention
    from kernels.attention import varlen_cu_seqlens
    text_only = not bool((img_BT >= 0).any())
    fns = {}
    for name in names:
        if name == "ours":
            fns[name] = lambda q, k, v: packed_attention(q, k, v, doc_BT, img_BT, backend="triton", ranges=ranges)
        elif name == "flex":
            bm, flex = flex_block_mask(doc_BT, img_BT, ranges), compiled_flex(tuple(qkv_shape))
            fns[name] = lambda q, k, v, bm=bm, flex=flex: flex(q, k, v, block_mask=bm)
        elif name == "flash_attn" and text_only:
            try:
                import flash_attn  # noqa: F401
            except ImportError:
                continue
            cu = varlen_cu_seqlens(doc_BT)
            fns[name] = lambda q, k, v, cu=cu: flash_attn_varlen_packed(q, k, v, doc_BT, img_BT, cu_seqlens=cu)
        elif name == "sdpa_causal" and text_only:
            fns[name] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif name == "sdpa_dense":
            mask_B1TT = dense_mask(doc_BT, img_BT)[:, None]
            fns[name] = lambda q, k, v, m=mask_B1TT: F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        elif name not in ("flash_attn", "sdpa_causal", "flex"):
            raise SystemExit(f"unknown backend {name!r}")
    return fns


# ── checks, counters, tile work ─────────────────────────────────────────────────────────────────

def check(fn, q, k, v, doc_BT, img_BT, tol) -> dict:
    """Output and dq, dk, dv of row 0, heads 0..1 against the fp32 dense reference."""
    from kernels.attention import reference_attention
    qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(qg, kg, vg)
    do = torch.zeros_like(out)
    do[:1, :2] = torch.randn_like(out[:1, :2])
    out.backward(do)
    ref_in = [x[:1, :2].detach().float().requires_grad_() for x in (q, k, v)]
    ref = reference_attention(*ref_in, doc_BT[:1], img_BT[:1])
    ref.backward(do[:1, :2].float())
    errs = {}
    for name, got, want in [("out", out, ref)] + [(f"d{n}", x.grad, r.grad) for n, x, r in zip("qkv", (qg, kg, vg), ref_in)]:
        errs[name] = rel_err(got[:1, :2], want)
    worst = max(errs, key=errs.get)
    return dict(errors=errs, check="ok" if errs[worst] < tol else f"FAIL {worst} {errs[worst]:.1e} >= {tol:.0e}")


def dynamo_counts() -> dict:
    from torch._dynamo.utils import counters
    return dict(frames=int(counters["frames"]["total"]), graphs=int(counters["stats"]["unique_graphs"]),
                limit_hits=sum(v for k, v in counters["frames"].items() if "limit" in k)
                + sum(v for k, v in counters["recompiles"].items() if "limit" in k))


def tile_work(ranges, T: int, cfg) -> dict:
    """Visited share of all tiles and visited pairs / allowed pairs, forward and dK/dV passes."""
    from kernels.attention_triton import tile_schedule
    allowed = float((ranges.kv_end - ranges.kv_start).long().sum())
    out = {}
    for name, (s, e, rows, cols) in {"fwd": (ranges.kv_start, ranges.kv_end, cfg.fwd_m, cfg.fwd_n),
                                     "dkdv": (ranges.q_start, ranges.q_end, cfg.dkdv_n, cfg.dkdv_m)}.items():
        visited, _ = tile_schedule(s, e, rows, cols, T)
        out[f"{name}_tiles_visited"] = float(visited.float().mean())
        out[f"{name}_pairs_over_allowed"] = float(visited.sum()) * rows * cols / allowed
    return out


# ── one case ────────────────────────────────────────────────────────────────────────────────────

def time_backend(timer, fn, q, k, v, do):
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))

    def fwd():
        with torch.no_grad():
            fn(q, k, v)

    def step():
        fn(qg, kg, vg).backward(do)

    if not getattr(timer, "smoke", False):
        fwd(), step()  # compile outside the timed region
    return timer(fwd), timer(step, grad_to_none=[qg, kg, vg])


def run_case(args, source, T, D, timer, device, dtype) -> list[dict]:
    from kernels.attention import attention_ranges
    from kernels.attention_layouts import random_layout, source_layout
    from kernels.attention_triton import padded_head_dim, tile_config
    B, H = max(1, args.tokens // T), max(1, PRESET_DH_WIDTH.get(D, 2048) // D)
    if args.smoke:
        B, H = 2, 2
        doc_BT, img_BT = random_layout(B, T, seed=args.seed + T + D) if source != "text" else (
            torch.arange(B * T, dtype=torch.int32).view(B, T) // 7, torch.full((B, T), -1, dtype=torch.int32))
    else:
        doc_BT, img_BT = source_layout(source, B, T, seed=args.seed)
    doc_BT, img_BT = doc_BT.to(device), img_BT.to(device)
    ranges = attention_ranges(doc_BT, img_BT)
    pairs = float((ranges.kv_end - ranges.kv_start).long().sum())
    fwd_flops = 4.0 * pairs * H * D
    g = torch.Generator(device=device).manual_seed(args.seed + T + D)
    q, k, v, do = (torch.randn(B, H, T, D, device=device, dtype=dtype, generator=g) for _ in range(4))
    base = dict(source=source, T=T, Dh=D, B=B, H=H, allowed_pair_fraction=pairs / (B * T * T))
    rows = []
    for name, fn in make_backends(args.backends, doc_BT, img_BT, ranges, q.shape).items():
        row = dict(base, backend=name)
        try:
            if name == "ours":
                row.update(tile_work(ranges, T, tile_config(q)), head_dim_processed=padded_head_dim(D))
            if name == "sdpa_causal":
                row.update(check="n/a (whole-row causal mask)", errors={})
            else:
                row.update(check(fn, q, k, v, doc_BT, img_BT, TOL[dtype]))
            before = dynamo_counts()
            fwd, fb = time_backend(timer, fn, q, k, v, do)
            if name == "flex":
                compiled, after = dynamo_counts(), None
                row.update(flex_graphs=compiled["graphs"])
                fwd, fb = time_backend(timer, fn, q, k, v, do)  # timed again: nothing may compile now
                after = dynamo_counts()
                row.update(flex_frames_during_timing=after["frames"] - compiled["frames"],
                           flex_limit_hits=after["limit_hits"] - before["limit_hits"])
                state = (f"{compiled['graphs']} graphs compiled, {row['flex_frames_during_timing']} frames "
                         f"compiled while timed, {row['flex_limit_hits']} recompile-limit hits")
                if after["frames"] != compiled["frames"] or row["flex_limit_hits"] or not compiled["graphs"]:
                    row["check"] = f"FAIL flex not a compiled steady state: {state}"
                elif row["check"] == "ok":
                    row["check"] = f"ok (flex: {state})"
            row.update(fwd_ms=fwd, fwd_bwd_ms=fb, fwd_tflops=fwd_flops / fwd / 1e9,
                       fwd_bwd_tflops=3.5 * fwd_flops / fb / 1e9)
        except Exception as e:  # a backend failing must not hide the others' numbers
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            if name == "ours":
                row["check"] = "FAIL (error)"
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def sweep_tiles(args, source, T, D, timer, device, dtype) -> list[dict]:
    from kernels.attention_triton import TileConfig, set_tile_config
    out = []
    for cfg in TILE_SWEEP:
        set_tile_config(TileConfig(*cfg))
        try:
            for r in run_case(argparse.Namespace(**{**vars(args), "backends": ["ours"]}), source, T, D,
                              timer, device, dtype):
                out.append(dict(r, tiles=list(cfg)))
        finally:
            set_tile_config(None)
    return out


# ── output ──────────────────────────────────────────────────────────────────────────────────────

HEADER = ("| source | T | Dh | B | H | backend | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | "
          "tiles visited fwd / dkdv | pairs in visited tiles / allowed | max rel err | check |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def _f(v, spec):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def format_row(r) -> str:
    pre = f"| {r['source']} | {r['T']} | {r['Dh']} | {r['B']} | {r['H']} | {r['backend']} | "
    if "error" in r:
        return pre + f"error: {r['error']} | | | | | | | {r.get('check', '')} |"
    tiles = (f"{r['fwd_tiles_visited']:.2f} / {r['dkdv_tiles_visited']:.2f} | "
             f"{r['fwd_pairs_over_allowed']:.2f} / {r['dkdv_pairs_over_allowed']:.2f}"
             if "fwd_tiles_visited" in r else "| ")
    err = _f(max(r["errors"].values()), ".1e") if r.get("errors") else "-"
    return pre + (f"{_f(r['fwd_ms'], '.3f')} | {_f(r['fwd_tflops'], '.0f')} | {_f(r['fwd_bwd_ms'], '.3f')} | "
                  f"{_f(r['fwd_bwd_tflops'], '.0f')} | {tiles} | {err} | {r['check']} |")


def summary(rows) -> list[str]:
    """Ours against the issue's targets: >= 1.3x flex on image+text rows, >= 0.9x flash-attn (or
    the SDPA causal floor) on text rows, forward+backward."""
    by = {(r["source"], r["T"], r["Dh"], r["backend"]): r for r in rows if "fwd_bwd_ms" in r}
    out = ["| source | T | Dh | ours vs flex | ours vs flash_attn | ours vs sdpa_causal |", "|---|---|---|---|---|---|"]
    for (s, T, D, b), r in sorted(by.items()):
        if b == "ours":
            cells = []
            for other in ("flex", "flash_attn", "sdpa_causal"):
                o = by.get((s, T, D, other))
                cells.append(f"{o['fwd_bwd_ms'] / r['fwd_bwd_ms']:.2f}x" if o and r["fwd_bwd_ms"] == r["fwd_bwd_ms"] else "-")
            out.append(f"| {s} | {T} | {D} | " + " | ".join(cells) + " |")
    return out


def failures(rows) -> list[dict]:
    return [r for r in rows if str(r.get("check", "ok")).startswith("FAIL")]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1" and "kernels.attention_triton" in sys.modules:
            sys.exit("bench_attention --smoke: kernels were imported without TRITON_INTERPRET=1")
        os.environ["TRITON_INTERPRET"] = "1"
        device, dtype = torch.device("cpu"), torch.float32
        args.backends = [b for b in args.backends if b in ("ours", "sdpa_dense", "sdpa_causal")]
        if args.T == parse_args([]).T:
            args.T = [37]
        if args.dh == parse_args([]).dh:
            args.dh = [16, 48]
    else:
        if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
            sys.exit("bench_attention: needs a CUDA GPU and TRITON_INTERPRET unset (use --smoke on CPU: "
                     "checks only, no timings). Nothing was run.")
        device, dtype = torch.device("cuda"), torch.bfloat16
        if args.quick:
            args.sources, args.T, args.dh = ["caption", "text"], [1024, 4096], [96, 128]
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    timer = make_timer(args.smoke, args.warmup, args.rep)
    env = environment(device)
    print(f"# {env['device']} | torch {env['torch']} | CUDA {env['cuda']} | triton {env['triton']} | "
          f"flash-attn {env['flash_attn']} | {'fp32 smoke' if args.smoke else 'bf16'} | "
          f"{args.tokens} tokens/batch\n{HEADER}", flush=True)
    rows, tile_rows = [], []
    for T in args.T:  # sources innermost: their cases share one shape, hence one flex compile
        for D in args.dh:
            for source in args.sources:
                rows += run_case(args, source, T, D, timer, device, dtype)
                if args.sweep_tiles:
                    tile_rows += sweep_tiles(args, source, T, D, timer, device, dtype)
    bad = failures(rows + tile_rows)
    lines = ["", "Speed-up of ours, forward+backward (time of other / time of ours):", ""] + summary(rows)
    if tile_rows:
        lines += ["", "Tile sweep for ours:", "", HEADER] + [format_row(r) + f" tiles {r['tiles']}" for r in tile_rows]
    lines += ["", f"{len(rows) + len(tile_rows)} rows, {len(bad)} failed checks"] + [format_row(r) for r in bad]
    print("\n".join(lines))
    if not args.smoke:
        with open(args.out, "w") as f:
            json.dump(dict(environment=env, args=vars(args), results=rows, tile_sweep=tile_rows), f, indent=1)
        print(f"\nwrote {args.out}")
    if args.md:
        with open(args.md, "w") as f:
            f.write(f"# Attention benchmark\n\n`python tools/bench_attention.py {' '.join(argv or sys.argv[1:])}` on "
                    f"{env['device']}; torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}, "
                    f"flash-attn {env['flash_attn']}; {'fp32 smoke' if args.smoke else 'bf16'}; {args.tokens} tokens "
                    f"per batch, H = preset width / Dh; {env['date_utc']} UTC. Times: do_bench medians.\n\n")
            f.write(HEADER + "\n" + "\n".join(format_row(r) for r in rows) + "\n" + "\n".join(lines) + "\n")
        print(f"wrote {args.md}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
