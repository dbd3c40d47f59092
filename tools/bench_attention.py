"""Benchmark packed multimodal attention backends on one GPU (issue 5).

Times forward and forward+backward of
  ours        the Triton kernel (kernels/attention_triton.py), ranges precomputed once per batch
  flex        torch FlexAttention, compiled, with a block mask built once from the same ranges
  flash_attn  flash-attn varlen causal, one sequence per document (text rows only; optional)
  sdpa_dense  torch SDPA with a dense bool mask (whatever SDPA kernel accepts an arbitrary mask)
in bf16, for T = 1k, 2k, 4k, 8k, head dims 64 and 128, on rows shaped like the three data sources
(kernels/attention_layouts.py: caption rows with ~3 images of 256 patches per 1k tokens,
interleaved rows, text rows). Batch setup (ranges, block mask, cu_seqlens, dense mask) is
excluded from the timings: it is done once per batch and shared by all layers.

TFLOP/s count only allowed query-key pairs: forward 4·pairs·H·Dh, backward 2.5x that, so a
backend that skips more masked work shows more throughput, not less. Times are the median of
triton.testing.do_bench after its warm-up. Each backend's output is first checked against an
fp32 reference on a slice of the batch ("max err").

Run (GPU only; refuses to run on CPU):
    python tools/bench_attention.py                          # full grid, table + JSON
    python tools/bench_attention.py --T 1024 2048 --dh 128   # a subset
    python tools/bench_attention.py --sweep-tiles            # also try other tile configs for ours
    python tools/bench_attention.py --md tools/bench_attention_results.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels.attention import (attention_ranges, dense_mask, flash_attn_varlen_packed,  # noqa: E402
                               flex_attention_packed, flex_block_mask, packed_attention,
                               reference_attention, varlen_cu_seqlens)
from kernels.attention_layouts import source_layout  # noqa: E402

SOURCES = ("caption", "interleaved", "text")
DEVICE = "cuda"
TILE_SWEEP = [  # (fwd_m, fwd_n, dkdv_m, dkdv_n, dq_m, dq_n, warps, stages, bwd_warps, bwd_stages)
    (128, 64, 64, 128, 128, 64, 8, 3, 8, 3),  # default, Dh <= 64
    (128, 64, 32, 128, 64, 64, 8, 3, 8, 2),  # default, Dh > 64
    (128, 128, 64, 128, 128, 64, 8, 3, 8, 3),
    (128, 64, 32, 128, 128, 32, 4, 3, 4, 3),
    (128, 64, 32, 128, 128, 32, 8, 4, 8, 2),
    (64, 64, 64, 64, 64, 64, 4, 3, 4, 3),
    (128, 32, 32, 64, 64, 32, 4, 4, 4, 4),
]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--T", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--dh", type=int, nargs="+", default=[64, 128])
    p.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    p.add_argument("--backends", nargs="+", default=["ours", "flex", "flash_attn", "sdpa_dense"])
    p.add_argument("--tokens", type=int, default=16384, help="tokens per batch (B = tokens // T)")
    p.add_argument("--width", type=int, default=2048, help="model width (H = width // Dh)")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sweep-tiles", action="store_true", help="also time ours under the TILE_SWEEP configs")
    p.add_argument("--out", default="tools/bench_attention_results.json")
    p.add_argument("--md", default=None, help="also write the markdown table to this path")
    return p.parse_args()


def environment() -> dict:
    import triton
    try:
        import flash_attn
        fa = flash_attn.__version__
    except ImportError:
        fa = None
    return dict(device=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                torch=torch.__version__, cuda=torch.version.cuda, triton=triton.__version__, flash_attn=fa,
                python=platform.python_version(), date_utc=time.strftime("%Y-%m-%d %H:%M", time.gmtime()))


def allowed_pairs(ranges) -> int:
    return int((ranges.kv_end - ranges.kv_start).long().sum())


def make_backends(names, doc_BT, img_BT, ranges):
    """name -> callable(q, k, v); per-batch set-up done here, outside the timed region."""
    fns = {}
    for name in names:
        if name == "ours":
            fns[name] = lambda q, k, v: packed_attention(q, k, v, doc_BT, img_BT, backend="triton", ranges=ranges)
        elif name == "flex":
            bm = flex_block_mask(doc_BT, img_BT, ranges)
            fns[name] = lambda q, k, v, bm=bm: flex_attention_packed(q, k, v, doc_BT, img_BT, block_mask=bm)
        elif name == "flash_attn":
            if bool((img_BT >= 0).any()):
                continue  # invalid with images: flash-attn cannot express the bidirectional spans
            try:
                import flash_attn  # noqa: F401
            except ImportError:
                continue
            cu = varlen_cu_seqlens(doc_BT)
            fns[name] = lambda q, k, v, cu=cu: flash_attn_varlen_packed(q, k, v, doc_BT, img_BT, cu_seqlens=cu)
        elif name == "sdpa_dense":
            mask_B1TT = dense_mask(doc_BT, img_BT)[:, None]
            fns[name] = lambda q, k, v, m=mask_B1TT: F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        else:
            raise SystemExit(f"unknown backend {name!r}")
    return fns


def max_err(fn, q, k, v, doc_BT, img_BT) -> float:
    """Max |fn - fp32 reference| on row 0, heads 0..1 (a slice keeps the dense reference small)."""
    with torch.no_grad():
        out = fn(q, k, v)[:1, :2].float()
        ref = reference_attention(*(x[:1, :2].float() for x in (q, k, v)), doc_BT[:1], img_BT[:1])
    return float((out - ref).abs().max())


def time_backend(fn, q, k, v, do, warmup, rep):
    from triton.testing import do_bench
    fwd = do_bench(lambda: fn(q, k, v), warmup=warmup, rep=rep, return_mode="median")
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))

    def step():
        fn(qg, kg, vg).backward(do)

    fb = do_bench(step, warmup=warmup, rep=rep, grad_to_none=[qg, kg, vg], return_mode="median")
    return fwd, fb


def run_case(args, source, T, D, rows, tile_rows):
    from kernels.attention_triton import TileConfig, set_tile_config
    B, H = max(1, args.tokens // T), max(1, args.width // D)
    doc_BT, img_BT = (x.to(DEVICE) for x in source_layout(source, B, T, seed=args.seed))
    ranges = attention_ranges(doc_BT, img_BT)
    pairs = allowed_pairs(ranges)
    fwd_flops = 4.0 * pairs * H * D
    g = torch.Generator(device=DEVICE).manual_seed(args.seed)
    q, k, v, do = (torch.randn(B, H, T, D, device=DEVICE, dtype=torch.bfloat16, generator=g) for _ in range(4))
    base = dict(source=source, T=T, Dh=D, B=B, H=H, allowed_pair_fraction=pairs / (B * T * T))
    for name, fn in make_backends(args.backends, doc_BT, img_BT, ranges).items():
        row = dict(base, backend=name)
        try:
            row["max_err"] = max_err(fn, q, k, v, doc_BT, img_BT)
            fwd, fb = time_backend(fn, q, k, v, do, args.warmup, args.rep)
            row.update(fwd_ms=fwd, fwd_bwd_ms=fb, fwd_tflops=fwd_flops / fwd / 1e9,
                       fwd_bwd_tflops=3.5 * fwd_flops / fb / 1e9)
        except torch.cuda.OutOfMemoryError:
            row["error"] = "out of memory"
        except Exception as e:  # a backend failing must not hide the others' numbers
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        torch.cuda.empty_cache()
        rows.append(row)
        print(format_row(row), flush=True)
    if args.sweep_tiles:
        for cfg in TILE_SWEEP:
            set_tile_config(TileConfig(*cfg))
            fn = make_backends(["ours"], doc_BT, img_BT, ranges)["ours"]
            row = dict(base, backend="ours", tiles=list(cfg))
            try:
                row["max_err"] = max_err(fn, q, k, v, doc_BT, img_BT)
                fwd, fb = time_backend(fn, q, k, v, do, args.warmup, args.rep)
                row.update(fwd_ms=fwd, fwd_bwd_ms=fb)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            tile_rows.append(row)
        set_tile_config(None)


HEADER = ("| source | T | Dh | B | H | backend | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | max err |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")


def format_row(r) -> str:
    if "error" in r:
        return (f"| {r['source']} | {r['T']} | {r['Dh']} | {r['B']} | {r['H']} | {r['backend']} | "
                f"{r['error']} | | | | |")
    return (f"| {r['source']} | {r['T']} | {r['Dh']} | {r['B']} | {r['H']} | {r['backend']} | "
            f"{r['fwd_ms']:.3f} | {r['fwd_tflops']:.0f} | {r['fwd_bwd_ms']:.3f} | {r['fwd_bwd_tflops']:.0f} | "
            f"{r['max_err']:.1e} |")


def summary(rows) -> list[str]:
    """Ours against the issue's targets: >= 1.3x flex (fwd+bwd, multimodal), >= 0.9x flash-attn (text)."""
    by = {(r["source"], r["T"], r["Dh"], r["backend"]): r for r in rows if "error" not in r}
    out = ["| source | T | Dh | ours vs flex (fwd+bwd) | ours vs flash_attn (fwd+bwd) |", "|---|---|---|---|---|"]
    for (s, T, D, b), r in sorted(by.items()):
        if b != "ours":
            continue
        fx, fa = by.get((s, T, D, "flex")), by.get((s, T, D, "flash_attn"))
        vs_fx = f"{fx['fwd_bwd_ms'] / r['fwd_bwd_ms']:.2f}x" if fx else "-"
        vs_fa = f"{fa['fwd_bwd_ms'] / r['fwd_bwd_ms']:.2f}x" if fa else "-"
        out.append(f"| {s} | {T} | {D} | {vs_fx} | {vs_fa} |")
    return out


def main():
    args = parse_args()
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("bench_attention: needs a CUDA GPU and TRITON_INTERPRET unset; timings are never "
                 "taken on CPU or under the interpreter. Nothing was run.")
    env = environment()
    print(f"# {env['device']} | torch {env['torch']} | CUDA {env['cuda']} | triton {env['triton']} | "
          f"flash-attn {env['flash_attn']} | bf16 | {args.tokens} tokens/batch, width {args.width}")
    print(HEADER)
    rows, tile_rows = [], []
    for source in args.sources:
        for T in args.T:
            for D in args.dh:
                run_case(args, source, T, D, rows, tile_rows)
    lines = ["", "Speed-up of ours (time of other / time of ours):", ""] + summary(rows)
    if tile_rows:
        lines += ["", "Tile sweep for ours (fwd ms / fwd+bwd ms):", ""]
        lines += [f"| {r['source']} | {r['T']} | {r['Dh']} | {r['tiles']} | "
                  + (r["error"] if "error" in r else f"{r['fwd_ms']:.3f} / {r['fwd_bwd_ms']:.3f}") + " |"
                  for r in tile_rows]
    print("\n".join(lines))
    with open(args.out, "w") as f:
        json.dump(dict(environment=env, args=vars(args), results=rows, tile_sweep=tile_rows), f, indent=1)
    print(f"\nwrote {args.out}")
    if args.md:
        with open(args.md, "w") as f:
            f.write(f"# Attention benchmark\n\n`python tools/bench_attention.py` on {env['device']}; torch "
                    f"{env['torch']}, CUDA {env['cuda']}, triton {env['triton']}, flash-attn {env['flash_attn']}; "
                    f"bf16; {args.tokens} tokens per batch, H = {args.width} / Dh; {env['date_utc']} UTC.\n\n")
            f.write(HEADER + "\n" + "\n".join(format_row(r) for r in rows) + "\n" + "\n".join(lines) + "\n")
        print(f"wrote {args.md}")


if __name__ == "__main__":
    main()
