"""Compile the packed-attention Triton kernels for a GPU target on a machine without a GPU.

The interpreter tests (tests/test_attention_triton.py) check the math but never run Triton's
compiler; this module does, ahead of time, for an NVIDIA target (default sm_90, H100/H200), and
reads shared memory from Triton's metadata and registers/spills from `ptxas -v`. It catches
kernels that do not compile, tile configs that do not fit in shared memory, and configs that
spill, before anyone gets a GPU. It says nothing about speed.

The kernel is specialised as a real launch specialises it. Triton's JIT derives, from the launch
arguments, which pointers and integers are divisible by 16 (`tt.divisibility` hints: aligned,
vectorised, pipelined loads) and turns integers equal to 1 into constants. A bare `ASTSource`
without those hints compiles a different, less specialised kernel (with fewer registers and less
shared memory than the one a GPU would run). `launch_specialisation` applies the JIT's rule to
the arguments of a contiguous `[B, H, T, Dh]` launch (torch allocations are 16-byte aligned).
`ptxas` is the one Triton itself uses for the target (`get_ptxas(arch)`: ptxas for sm < 90,
ptxas-blackwell, a newer build, for sm_90+ in Triton 3.9).

Run (needs TRITON_INTERPRET unset; no GPU needed):
    python -m kernels.attention_aot                       # default tiles, bf16, Dh 32 64 80 96 128
    python -m kernels.attention_aot --arch 80             # A100
    python -m kernels.attention_aot --T 4093 --head-dims 128   # a T that is not a multiple of 16
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels import attention_triton as at

_RANGE_ARGS = ("KV_START", "KV_END", "Q_START", "Q_END")
_FP32_ARGS = ("LSE", "DELTA")
KERNELS = {"fwd": at._attn_fwd_kernel, "dkdv": at._attn_bwd_dkdv_kernel, "dq": at._attn_bwd_dq_kernel}
_TORCH_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _int_args(head_dim: int, H: int, T: int) -> dict:
    """Integer arguments of a launch on contiguous [B, H, T, Dh] tensors."""
    strides = {"b": H * T * head_dim, "h": T * head_dim, "t": head_dim}
    out = {"H": H, "T": T}
    for role in ("q", "k", "v", "o", "do"):
        for axis, v in strides.items():
            out[f"stride_{role}{axis}"] = v
    return out


def launch_specialisation(fn, dtype: str, head_dim: int, block_m: int, block_n: int, H: int, T: int):
    """(signature, constexprs, attrs) of `fn` as Triton's JIT would build them for this launch."""
    ints = _int_args(head_dim, H, T)
    consts_by_name = dict(at.head_dim_chunks(head_dim), BLOCK_M=block_m, BLOCK_N=block_n,
                          DOT_PREC=at._dot_precision(_TORCH_DTYPE[dtype]))
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts_by_name:
            sig[name] = "constexpr"
            consts[(i,)] = consts_by_name[name]
        elif name in ints:
            value = ints[name]
            if value == 1:  # the JIT turns an integer 1 into a constant
                sig[name] = "constexpr"
                consts[(i,)] = 1
                continue
            sig[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        else:  # a pointer: torch allocations are (at least) 16-byte aligned
            sig[name] = "*fp32" if name in _FP32_ARGS else "*i32" if name in _RANGE_ARGS else f"*{dtype}"
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def ptxas_path(arch: int) -> str | None:
    """The ptxas Triton uses for `arch` (None when this Triton build ships none)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        path = get_ptxas(arch).path
        if path and os.path.exists(path):
            return path
    except Exception:  # noqa: BLE001 (older/newer Triton: fall back to the bundled binary)
        pass
    cands = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas"))
    return cands[0] if cands else None


def compile_kernel(kind: str, dtype: str, head_dim: int, block_m: int, block_n: int,
                   num_warps: int, num_stages: int, arch: int = 90, H: int = 16, T: int = 4096) -> dict:
    """Compile one kernel as launched on [B, H, T, Dh]; returns shared memory bytes, wgmma/mma
    instruction counts and, when ptxas is found, registers and spill bytes. Raises whatever
    Triton raises when the kernel does not compile."""
    fn = KERNELS[kind]
    sig, consts, attrs = launch_specialisation(fn, dtype, head_dim, block_m, block_n, H, T)
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    ptx = compiled.asm["ptx"]
    info = dict(kind=kind, dtype=dtype, head_dim=head_dim, block_m=block_m, block_n=block_n,
                num_warps=num_warps, num_stages=num_stages, shared=compiled.metadata.shared,
                wgmma=ptx.count("wgmma.mma_async"), mma_sync=len(re.findall(r"\bmma\.sync", ptx)),
                divisibility_hints=len(attrs))
    ptxas = ptxas_path(arch)
    if ptxas:
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(ptx)
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        res = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull],
                             capture_output=True, text=True)
        os.unlink(f.name)
        text = res.stdout + res.stderr
        regs = re.search(r"Used (\d+) registers", text)
        spill = re.search(r"(\d+) bytes spill stores", text)
        if regs:
            info.update(registers=int(regs.group(1)), spill_bytes=int(spill.group(1)) if spill else 0,
                        ptxas=os.path.basename(ptxas))
        elif res.returncode:
            info["ptxas_error"] = text[-400:]
    return info


def default_configs(head_dims=(32, 64, 80, 96, 128), dtype: str = "bf16", arch: int = 90):
    """(kind, head_dim, block_m, block_n, warps, stages) of the default GPU tile configs."""
    out = []
    for head_dim in head_dims:
        cfg = at.gpu_tile_config(head_dim, _TORCH_DTYPE[dtype], arch // 10)
        out += [("fwd", head_dim, cfg.fwd_m, cfg.fwd_n, cfg.num_warps, cfg.num_stages),
                ("dkdv", head_dim, cfg.dkdv_m, cfg.dkdv_n, cfg.bwd_warps, cfg.bwd_stages),
                ("dq", head_dim, cfg.dq_m, cfg.dq_n, cfg.bwd_warps, cfg.bwd_stages)]
    return out


def main():
    p = argparse.ArgumentParser(description="AOT-compile the packed attention kernels (no GPU needed)")
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--head-dims", type=int, nargs="+", default=[32, 64, 80, 96, 128])
    p.add_argument("--H", type=int, default=16, help="heads of the launch being specialised")
    p.add_argument("--T", type=int, default=4096, help="sequence length of the launch being specialised")
    args = p.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter replaces the compiler")
    print(f"sm_{args.arch}, {args.dtype}, specialised as a launch with H={args.H}, T={args.T}; "
          f"ptxas: {ptxas_path(args.arch)}")
    for kind, d, bm, bn, w, s in default_configs(args.head_dims, args.dtype, args.arch):
        i = compile_kernel(kind, args.dtype, d, bm, bn, w, s, args.arch, args.H, args.T)
        print(f"{kind:5s} Dh={d:3d} tiles {bm:3d}x{bn:<3d} warps {w} stages {s}: shared {i['shared']} B, "
              f"registers {i.get('registers', '?')}, spills {i.get('spill_bytes', '?')} B, "
              f"wgmma {i['wgmma']}, mma.sync {i['mma_sync']}, hints {i['divisibility_hints']}"
              + (f", ptxas error: {i['ptxas_error']}" if "ptxas_error" in i else ""), flush=True)


if __name__ == "__main__":
    main()
