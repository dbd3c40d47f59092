"""Checkpoints: saving, resuming on the same or another layout, and reading them outside training.

Modules, one idea each:
- layout.py       where checkpoints live, which count (COMPLETE), run dir vs step dir
- safe_io.py      every file read with torch.load(weights_only=True), DeepSpeed's included
- rng.py          the RNG state of a rank, as plain tensors
- zero_files.py   DeepSpeed's files of any ZeRO stage / expert-parallel size -> full tensors
- shapes.py       does a checkpoint fit the config's model (names the differing keys)
- consolidated.py load_consolidated(path): full fp32 model state for tools and init_from
- save.py         writing a checkpoint
- resume.py       all ranks agree on one checkpoint and load it (elastic.py when the layout changed)
- elastic.py      full state -> a DeepSpeed engine of another world / expert-parallel size
- start.py        how a run starts: resume (data position re-split too), train.init_from, or fresh
"""
from pretrain.checkpoint.consolidated import Consolidated, load_consolidated
from pretrain.checkpoint.layout import COMPLETE, CheckpointError, complete_checkpoints, resolve_step_dir, tag_for
from pretrain.checkpoint.resume import load
from pretrain.checkpoint.rng import rng_state, set_rng_state
from pretrain.checkpoint.safe_io import safe_load
from pretrain.checkpoint.save import save
from pretrain.checkpoint.start import start

__all__ = ["COMPLETE", "CheckpointError", "Consolidated", "complete_checkpoints", "load", "load_consolidated",
           "resolve_step_dir", "rng_state", "safe_load", "save", "set_rng_state", "start", "tag_for"]
