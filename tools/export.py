"""Export a training run, one checkpoint step or a native export to a self-contained directory.

    python tools/export.py --checkpoint runs/demo --out exports/demo                 # native
    python tools/export.py --checkpoint runs/demo --out exports/demo-hf --format hf  # Qwen3 / Qwen3-MoE

--checkpoint takes a run directory (its newest complete checkpoint), a `checkpoints/step_XXXXXXXX`
directory (dense ZeRO 0-3, MoE at any expert-parallel size, late fusion) or a native export.
native: model.safetensors + config.json + tokenizer.model, loaded by
`pretrain.export.load_exported(DIR)` without DeepSpeed. hf: a directory that stock transformers
loads (`AutoModelForCausalLM` / `AutoTokenizer.from_pretrained(DIR)`; the image path with
`trust_remote_code=True`); models Qwen3 cannot express are refused (exit status 2) with the reason;
`--verify` compares the result's logits in transformers with ours (exit status 3 on a mismatch).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="run directory, checkpoint step directory or native export")
    p.add_argument("--out", required=True, help="output directory (created; files in it are overwritten)")
    p.add_argument("--format", choices=("native", "hf"), default="native")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the saved weights")
    p.add_argument("--verify", action="store_true",
                   help="hf: load the result with transformers and compare its logits with ours (fp32)")
    p.add_argument("--tokenizer", default=None,
                   help="sentencepiece model to ship (default: the run's data.tokenizer or its manifest's)")
    args = p.parse_args(argv)

    from pretrain.export.hf import ExportRefused, check_hf_exportable, export_hf, verify_hf_export
    from pretrain.export.native import export_native
    from pretrain.export.loading import load_source

    t0 = time.time()
    try:
        src = load_source(args.checkpoint)
        if args.format == "hf":  # refuse before any file is written
            check_hf_exportable(src.config)
    except ExportRefused as e:
        print(f"export refused: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"export: cannot read {args.checkpoint}: {e}", file=sys.stderr)
        return 1
    if args.tokenizer:
        if not Path(args.tokenizer).is_file():
            print(f"export: --tokenizer {args.tokenizer}: no such file", file=sys.stderr)
            return 1
        src.tokenizer_path = args.tokenizer
    if not src.tokenizer_path:
        print(f"export: warning: the run's tokenizer was not found (data.root={src.config.data.root!r}); "
              f"exporting without tokenizer files (pass --tokenizer PATH to include one)", file=sys.stderr)
    write = export_hf if args.format == "hf" else export_native
    out = write(src, args.out, dtype=DTYPES[args.dtype])
    n = sum(v.numel() for v in src.model_state.values())
    print(f"exported {args.format} model.kind={src.config.model.kind} step {src.step} "
          f"({n:,} parameters, {args.dtype}) from {src.path} to {out} in {time.time() - t0:.1f}s")
    if args.verify and args.format == "hf":
        diff = verify_hf_export(src, out, DTYPES[args.dtype])
        ok = diff <= 1e-4
        print(f"verify: transformers vs pretrain, max |logit difference| {diff:.3g} on a random text row "
              f"({'ok' if ok else 'MISMATCH'})")
        if not ok:
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
