"""Shared pytest set-up.

Triton kernels run on CPU tensors only under the interpreter, and `@triton.jit` reads
TRITON_INTERPRET when a kernel module is imported, so it is set here, before any test imports
`kernels.*`, on machines without a GPU.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _sweep_deepspeed_shm_buffers():
    """After each test, remove DeepSpeed CPU all-reduce buffers no live process maps (runs the
    test killed leave ~69 MB per rank in /dev/shm; a whole suite would fill the memory)."""
    yield
    from pretrain.launch.shm_buffers import sweep_unmapped
    sweep_unmapped()


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """A small deterministic demo corpus (tokenizer, shards, manifest) shared by the session."""
    from tests.helpers import make_tiny_demo
    return make_tiny_demo(tmp_path_factory.mktemp("tiny_demo"))
