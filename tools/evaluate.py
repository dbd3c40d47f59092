"""Evaluate a trained model: held-out loss per source, image captioning (CIDEr-D), VQAv2 accuracy.

    python tools/evaluate.py loss    --checkpoint runs/demo --out eval/demo
    python tools/evaluate.py caption --checkpoint runs/demo --demo-root data/demo --limit 64 --noise --out eval/demo
    python tools/evaluate.py caption --checkpoint exports/e932m --annotations coco/captions_val2014.json \\
        --images coco/val2014 --limit 5000 --out eval/e932m --device cuda --dtype bf16
    python tools/evaluate.py vqa     --checkpoint exports/e932m --questions v2_OpenEnded_mscoco_val2014_questions.json \\
        --annotations v2_mscoco_val2014_annotations.json --images coco/val2014 --shots 4 --out eval/e932m

Each run adds its entry to OUT/results.json (captioning_real, captioning_noise, vqa_real, heldout,
...), writes the per-example generations to OUT/<entry>.jsonl and prints a short table; captioning
also draws OUT/contact_sheet.png (images, generated caption, reference). `--noise` repeats the
task with every query image replaced by noise: the gap is what the model reads from pixels.
Prompts: `--shots K` (few-shot, shots drawn from the same set), `--prompt` (text after the query
image), `--shot-template`, `--separator`. CIDEr's tokenisation: `--tokenizer auto|ptb|python`
(pretrain/evaluate/cider.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pretrain.evaluate.cider import TOKENIZERS  # noqa: E402
from pretrain.evaluate.prompting import PromptConfig  # noqa: E402
from pretrain.evaluate.report import table, write_results  # noqa: E402
from pretrain.generate.cli import (add_generation_args, add_model_args, generation_config_from_args,  # noqa: E402
                                   model_from_args)


def prompt_config(args, caption: bool) -> PromptConfig:
    cfg = PromptConfig(shots=args.shots, separator=args.separator.encode().decode("unicode_escape"),
                       seed=args.seed, chat=getattr(args, "chat", False))
    if args.prompt is not None:
        if caption:
            cfg.caption_prompt = args.prompt
        else:
            cfg.vqa_prompt = args.prompt
    if args.shot_template is not None:
        if caption:
            cfg.caption_shot = args.shot_template
        else:
            cfg.vqa_shot = args.shot_template
    return cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="task", required=True)
    loss = sub.add_parser("loss", help="held-out loss per source on the run's data (or --data-root)")
    cap = sub.add_parser("caption", help="captioning, CIDEr-D, contact sheet")
    vqa = sub.add_parser("vqa", help="VQAv2 accuracy")
    for sp in (loss, cap, vqa):
        add_model_args(sp)
        sp.add_argument("--out", required=True, help="directory for results.json, generations, PNG")
    loss.add_argument("--data-root", default=None, help="shards to evaluate on (default: the run's data.root)")
    loss.add_argument("--batches", type=int, default=50, help="held-out batches per source")
    loss.add_argument("--micro-batch-size", type=int, default=8)
    for sp, max_new in ((cap, 24), (vqa, 8)):
        sp.add_argument("--limit", type=int, default=None, help="first N examples (sorted by id)")
        sp.add_argument("--batch-size", type=int, default=16, help="prompts generated together")
        sp.add_argument("--noise", action="store_true", help="also run with noise instead of the images")
        sp.add_argument("--shots", type=int, default=0, help="few-shot examples before the query")
        sp.add_argument("--prompt", default=None, help="text after the query image "
                        "(caption default: none; VQA default: 'Question: {question} Answer:')")
        sp.add_argument("--shot-template", default=None, help="a shot's text after its image "
                        "(caption default '{caption}'; VQA 'Question: {question} Answer: {answer}')")
        sp.add_argument("--separator", default="\\n", help="after each shot; also a stop string with shots")
        sp.add_argument("--annotations", default=None, help="COCO captions JSON / VQAv2 annotations JSON")
        sp.add_argument("--images", default=None, help="image folder")
        add_generation_args(sp, max_new_tokens=max_new)
    cap.add_argument("--demo-root", default=None, help="use the demo corpus's held-out captions instead")
    cap.add_argument("--tokenizer", choices=TOKENIZERS, default="auto", help="caption tokenisation for CIDEr")
    cap.add_argument("--sheet", type=int, default=16, help="images on the contact sheet")
    vqa.add_argument("--questions", default=None, help="VQAv2 questions JSON")
    vqa.add_argument("--image-pattern", default="COCO_val2014_{image_id:012d}.jpg",
                     help="image file name of an image_id")
    vqa.add_argument("--chat", action="store_true", help="ask in the chat template (instruction-tuned "
                     "models, pretrain/configs/sft_*.yaml): <|user|> image question <|end|> <|assistant|>")
    args = p.parse_args(argv)
    out = Path(args.out)
    lm = model_from_args(args)
    print(f"[evaluate] {lm.source} (step {lm.step}) on {args.device}", file=sys.stderr)
    written = {}

    if args.task == "loss":
        from pretrain.evaluate.heldout import heldout_loss
        run_cfg = lm.config
        if args.data_root:
            run_cfg.data.root = args.data_root
        written["heldout"] = heldout_loss(lm.model, run_cfg, args.batches, args.micro_batch_size)
        write_results(out, "heldout", written["heldout"])
    else:
        from pretrain.evaluate import datasets
        from pretrain.evaluate.demo_captions import caption_sheet, demo_caption_examples
        from pretrain.evaluate.tasks import run_captioning, run_vqa
        gen_cfg = generation_config_from_args(args)
        if args.task == "caption":
            if args.demo_root:
                examples = demo_caption_examples(args.demo_root, args.limit or 64)
            elif args.annotations and args.images:
                examples = datasets.load_coco_captions(args.annotations, args.images, args.limit)
            else:
                p.error("caption needs --annotations and --images, or --demo-root")
            for mode in ["real"] + (["noise"] if args.noise else []):
                result, records = run_captioning(lm, examples, prompt_config(args, True), gen_cfg,
                                                 args.batch_size, args.tokenizer, images=mode)
                written[f"captioning_{mode}"] = result
                write_results(out, f"captioning_{mode}", result, records)
                if mode == "real" and args.sheet:
                    sheet = caption_sheet(out / "contact_sheet.png", examples, records, args.sheet,
                                          f"{lm.source} step {lm.step}: CIDEr-D {result['cider']:.3f} "
                                          f"on {len(examples)} images")
                    print(f"[evaluate] contact sheet: {sheet}", file=sys.stderr)
        else:
            if not (args.questions and args.annotations and args.images):
                p.error("vqa needs --questions, --annotations and --images")
            examples = datasets.load_vqav2(args.questions, args.annotations, args.images,
                                           args.image_pattern, args.limit)
            for mode in ["real"] + (["noise"] if args.noise else []):
                result, records = run_vqa(lm, examples, prompt_config(args, False), gen_cfg, args.batch_size,
                                          images=mode)
                written[f"vqa_{mode}"] = result
                write_results(out, f"vqa_{mode}", result, records)
    print(table(written))
    print(f"[evaluate] results: {out / 'results.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
