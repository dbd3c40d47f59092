"""From checkpoint to model: consolidated exports that load without DeepSpeed.

Two formats, both one directory:

- native (`pretrain.export.native`): `model.safetensors` (our module's own parameter names, every
  expert included), `config.json` (the run's model section, enough to rebuild it with
  `build_model`, plus the data section for image preprocessing) and `tokenizer.model`.
  `load_exported(DIR)` rebuilds the module; `load_model(PATH)` also takes a training run or
  checkpoint directory.
- Hugging Face (`pretrain.export.hf`): a Qwen3 / Qwen3-MoE directory that stock `transformers`
  loads (`AutoModelForCausalLM.from_pretrained(DIR)`, `AutoTokenizer.from_pretrained(DIR)`), with
  the image path in the same files for a small remote-code class
  (`trust_remote_code=True`, `pretrain/export/modeling_native_mm.py`).

Command line:  python tools/export.py --checkpoint runs/demo --out exports/demo [--format hf]
"""
from pretrain.export.loading import load_model, load_source
from pretrain.export.native import export_native, load_exported
from pretrain.export.source import LoadedModel

__all__ = ["LoadedModel", "export_native", "load_exported", "load_model", "load_source"]
