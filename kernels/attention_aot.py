"""Compile the packed-attention Triton kernels for a GPU target on a machine without a GPU.

The interpreter tests (tests/test_attention_triton.py) check the math but never run Triton's
compiler; this module does, ahead of time, for an NVIDIA target (default sm_90, H100), and reads
shared memory from Triton's metadata and registers/spills from `ptxas -v`. It catches kernels
that do not compile, tile configs that do not fit in shared memory, and configs that spill,
before anyone gets a GPU. It says nothing about speed.

Run (needs TRITON_INTERPRET unset; no GPU needed):
    python -m kernels.attention_aot                 # the default tile configs, bf16, Dh 64 and 128
    python -m kernels.attention_aot --arch 80       # A100
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels import attention_triton as at

_CONSTEXPRS = ("HEAD_DIM", "BLOCK_D", "BLOCK_M", "BLOCK_N", "DOT_PREC")
_RANGE_ARGS = ("KV_START", "KV_END", "Q_START", "Q_END")
KERNELS = {"fwd": at._attn_fwd_kernel, "dkdv": at._attn_bwd_dkdv_kernel, "dq": at._attn_bwd_dq_kernel}


def _signature(fn, dtype: str, head_dim: int, block_m: int, block_n: int):
    sig, consts = {}, {}
    for name in fn.arg_names:
        if name.startswith("stride") or name in ("H", "T"):
            sig[name] = "i32"
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        elif name in ("LSE", "DELTA"):
            sig[name] = "*fp32"
        elif name in _RANGE_ARGS:
            sig[name] = "*i32"
        elif name in _CONSTEXPRS:
            sig[name] = "constexpr"
        else:
            sig[name] = f"*{dtype}"
    values = dict(HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_M=block_m,
                  BLOCK_N=block_n, DOT_PREC="ieee" if dtype == "fp32" else "tf32")
    for name, v in values.items():
        consts[(fn.arg_names.index(name),)] = v
    return sig, consts


def _ptxas() -> str | None:
    # Triton ships ptxas builds; pick the newest (the PTX Triton emits may need a recent one).
    cands = sorted(glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas*")))
    return cands[-1] if cands else None


def compile_kernel(kind: str, dtype: str, head_dim: int, block_m: int, block_n: int,
                   num_warps: int, num_stages: int, arch: int = 90) -> dict:
    """Compile one kernel; returns shared memory bytes and, when ptxas is found, registers and
    spill bytes. Raises whatever Triton raises when the kernel does not compile."""
    fn = KERNELS[kind]
    sig, consts = _signature(fn, dtype, head_dim, block_m, block_n)
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                              target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    info = dict(kind=kind, dtype=dtype, head_dim=head_dim, block_m=block_m, block_n=block_n,
                num_warps=num_warps, num_stages=num_stages, shared=compiled.metadata.shared)
    ptxas = _ptxas()
    if ptxas:
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(compiled.asm["ptx"])
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        res = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull],
                             capture_output=True, text=True)
        os.unlink(f.name)
        text = res.stdout + res.stderr
        regs = re.search(r"Used (\d+) registers", text)
        spill = re.search(r"(\d+) bytes spill stores", text)
        if regs:
            info.update(registers=int(regs.group(1)), spill_bytes=int(spill.group(1)) if spill else 0)
    return info


def default_configs(head_dims=(64, 128)):
    """(kind, head_dim, block_m, block_n, warps, stages) of the default GPU tile configs."""
    out = []
    for head_dim in head_dims:
        cfg = at._GPU_TILES_D64 if head_dim <= 64 else at._GPU_TILES_D128
        out += [("fwd", head_dim, cfg.fwd_m, cfg.fwd_n, cfg.num_warps, cfg.num_stages),
                ("dkdv", head_dim, cfg.dkdv_m, cfg.dkdv_n, cfg.bwd_warps, cfg.bwd_stages),
                ("dq", head_dim, cfg.dq_m, cfg.dq_n, cfg.bwd_warps, cfg.bwd_stages)]
    return out


def main():
    p = argparse.ArgumentParser(description="AOT-compile the packed attention kernels (no GPU needed)")
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    args = p.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter replaces the compiler")
    for kind, d, bm, bn, w, s in default_configs(args.head_dims):
        i = compile_kernel(kind, args.dtype, d, bm, bn, w, s, args.arch)
        print(f"{kind:5s} Dh={d:3d} tiles {bm:3d}x{bn:<3d} warps {w} stages {s}: shared {i['shared']} B, "
              f"registers {i.get('registers', '?')}, spills {i.get('spill_bytes', '?')} B")


if __name__ == "__main__":
    main()
