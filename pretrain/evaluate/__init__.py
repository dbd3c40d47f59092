"""Downstream evaluation of a trained model: held-out loss per source, image captioning (CIDEr-D)
and visual question answering (VQAv2 accuracy), with configurable zero- and few-shot prompts.

Modules: cider.py and vqa_metric.py (the metrics), datasets.py (COCO-caption and VQAv2 files),
prompting.py (prompt templates and shots), tasks.py (generation + scoring), contact_sheet.py (the
PNG), report.py (JSON and table), heldout.py (loss per source), demo_captions.py (the demo's
captions at the end of training). Command line: tools/evaluate.py. Tests:
tests/test_evaluate_metrics.py, tests/test_evaluate_tasks.py.
"""
