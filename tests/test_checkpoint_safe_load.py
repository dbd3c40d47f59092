"""Checkpoint files are read with weights_only=True (pretrain/checkpoint/safe_io.py): a planted
pickle that would run code is refused with a message naming the file, and the code never runs.
(DeepSpeed's own reads go through the same loader: tests/test_checkpoint_recovery.py plants such a
pickle in a DeepSpeed file of a run and resumes it.)"""
from __future__ import annotations

import pytest
import torch


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # unpickling calls open(marker, "w"): a stand-in for os.system
        return (open, (self.marker, "w"))


def test_planted_pickle_is_refused(tmp_path):
    from pretrain.checkpoint import CheckpointError, safe_load

    marker = tmp_path / "code_ran"
    bad = tmp_path / "rank_00000.pt"
    torch.save({"step": 3, "payload": _RunsCode(marker)}, bad)
    with pytest.raises(CheckpointError) as err:
        safe_load(bad)
    msg = str(err.value)
    assert str(bad) in msg and "refused" in msg and "open" in msg
    assert not marker.exists()
    # the same file really does run code when unpickled without the guard
    with open(bad, "rb"):
        torch.load(bad, weights_only=False)
    assert marker.exists()


def test_plain_data_and_deepspeed_records_load(tmp_path):
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    from pretrain.checkpoint import safe_load
    from pretrain.checkpoint.rng import rng_state

    good = tmp_path / "ok.pt"
    state = {"t": torch.arange(5), "stage": ZeroStageEnum.gradients, "addr": fragment_address(numel=4, start=2),
             "rng": rng_state(), "names": ["a", "b"]}
    torch.save(state, good)
    back = safe_load(good)
    assert torch.equal(back["t"], state["t"]) and back["stage"] == ZeroStageEnum.gradients
    assert back["addr"] == fragment_address(numel=4, start=2)


def test_damaged_file_is_named(tmp_path):
    from pretrain.checkpoint import CheckpointError, safe_load

    f = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(1000)}}, f)
    f.write_bytes(f.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt: unreadable"):
        safe_load(f)
