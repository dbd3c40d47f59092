"""Issue 5, acceptance 2 in miniature: a few optimizer steps of the demo model on demo batches
with `model.attention_backend=triton` (under TRITON_INTERPRET=1 on CPU) give the same losses as
the reference backend."""
import torch

from pretrain.config import load_config
from pretrain.data.loader import build_train_loader
from pretrain.models import build_model
from tests.helpers import REPO


def _losses(cfg, batches, backend):
    cfg.model.attention_backend = backend
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    out = []
    for b in batches:
        loss = model(b).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        out.append(float(loss))
    return out


def test_triton_backend_trains_like_reference(tiny_demo):
    cfg = load_config(REPO / "pretrain/configs/demo.yaml",
                      [f"data.root={tiny_demo}", "model.width=64", "model.depth=2", "model.head_dim=32",
                       "data.seq_len=64"])
    loader = build_train_loader(cfg.data, rank=0, world_size=1, micro_batch_size=2)
    batches = [next(loader) for _ in range(3)]
    ref = _losses(cfg, batches, "reference")
    tri = _losses(cfg, batches, "triton")
    assert ref[-1] < ref[0]
    torch.testing.assert_close(torch.tensor(tri), torch.tensor(ref), rtol=1e-4, atol=1e-4)
