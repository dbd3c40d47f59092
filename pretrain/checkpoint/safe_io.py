"""Reading checkpoint files without running code: `torch.load(weights_only=True)` everywhere.

`weights_only=True` unpickles tensors, containers and numbers only; any other global a file names
must be on an allow-list. Ours lists the few plain data types DeepSpeed 0.19 writes into its files
(a loss-scaler record, the ZeRO stage enum, fragment addresses; found with
`torch.serialization.get_unsafe_globals_in_checkpoint`) and numpy's array reconstruction, which
rank files written before the RNG state was stored as tensors hold. A file naming anything else
(e.g. `os.system`, planted to run code) is refused with a `CheckpointError` naming the file and
the global.

DeepSpeed reads its own files through a replaceable checkpoint engine
(`engine.checkpoint_engine.load`); `install_safe_engine(engine)` swaps in `SafeCheckpointEngine`,
which loads through `safe_load`.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from pretrain.checkpoint.layout import CheckpointError


def _allowed_globals() -> list:
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address, np.ndarray, np.dtype,
               type(np.dtype(np.uint32))]
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    allowed.append(_reconstruct)
    return allowed


def safe_load(path, map_location="cpu", **kwargs):
    """`torch.load(path, weights_only=True)` with DeepSpeed's record types allowed; any other
    global in the file, or a damaged file, raises `CheckpointError` naming the file."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused to load: the file holds objects other than tensors and "
                              f"plain data, which could run code when unpickled ({_first_line(e)})") from None
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    # torch's message for a refused global: keep the sentence that names it, not the advice.
    for line in text.splitlines():
        if "Unsupported global" in line or "GLOBAL" in line:
            return line.strip()
    first = text.splitlines()[0] if text else type(e).__name__
    return first.split(". ")[0]  # torch appends paragraphs of advice


def _safe_engine_class():
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch checkpoint engine, reading with `safe_load` (weights_only=True)."""
        safe = True

        def load(self, path: str, map_location=None):
            return safe_load(path, map_location=map_location if map_location is not None else "cpu")

    return SafeCheckpointEngine


def install_safe_engine(engine) -> None:
    """Make `engine.load_checkpoint` read every file with weights_only=True."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    current = engine.checkpoint_engine
    if getattr(current, "safe", False):
        return
    if type(current) is not TorchCheckpointEngine:
        raise CheckpointError(f"DeepSpeed uses checkpoint engine {type(current).__name__}; only the torch "
                              f"engine is wrapped for weights_only loading")
    safe = _safe_engine_class()(None)
    safe.zipfile_serialization = current.zipfile_serialization
    engine.checkpoint_engine = safe
