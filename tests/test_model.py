"""The early-fusion decoder: what the loss sees, what each token can see, and that it reads pixels."""
import pytest
import torch

from pretrain.config import load_config
from pretrain.data.loader import load_tokenizer
from pretrain.data.packing import Document, pack_documents
from pretrain.models import build_model
from tests.helpers import REPO


@pytest.fixture(scope="module")
def setup(tiny_demo):
    cfg = load_config(REPO / "pretrain/configs/demo.yaml",
                      [f"data.root={tiny_demo}", "model.width=64", "model.depth=2", "model.head_dim=16",
                       "data.seq_len=96"])
    tok = load_tokenizer(cfg.data)
    torch.manual_seed(0)
    model = build_model(cfg.model).double().eval()
    g = torch.Generator().manual_seed(1)
    img = lambda: (torch.rand(3, 32, 32, generator=g) * 255).to(torch.uint8)  # noqa: E731
    docs = [Document("interleaved", ["the first document", img(), "talks about a red circle"]),
            Document("caption", [img(), "a blue square at the top left."]),
            Document("text", ["plain words here and more words"])]
    batch = pack_documents(docs, cfg.data, tok, best_fit=True)
    batch.patches = batch.patches.double()
    return cfg, tok, model, batch


def token_losses(model, batch):
    out = model(batch, return_token_loss=True)
    return out.token_loss, out


def test_batch_is_packed_into_one_row(setup):
    _, _, _, batch = setup
    batch.validate()
    assert batch.tokens.shape[0] == 1 and int(batch.doc_ids.max()) >= 2


def test_tokens_at_patch_positions_are_ignored(setup):
    _, _, model, batch = setup
    base, _ = token_losses(model, batch)
    b2 = batch.with_patches(batch.patches)
    b2.tokens = torch.where(batch.is_patch, torch.randint_like(batch.tokens, 0, 100), batch.tokens)
    torch.testing.assert_close(token_losses(model, b2)[0], base, rtol=0, atol=0)


def test_model_reads_pixels(setup):
    _, _, model, batch = setup
    base, _ = token_losses(model, batch)
    other, _ = token_losses(model, batch.with_patches(torch.randn_like(batch.patches)))
    assert (other - base).abs().max() > 1e-6


def test_documents_are_isolated_and_text_is_causal(setup):
    _, _, model, batch = setup
    base, out = token_losses(model, batch)
    tgt_mask = batch.labels[0] != -100
    tgt_pos = tgt_mask.nonzero().squeeze(1)
    doc = batch.doc_ids[0]
    # Change one text token of the last real document: earlier documents' losses must not move.
    last_doc = int(doc[tgt_pos[-1]])
    pos = int(((doc == last_doc) & ~batch.is_patch[0]).nonzero()[-2])
    b2 = batch.with_patches(batch.patches)
    b2.tokens = batch.tokens.clone()
    b2.tokens[0, pos] = (b2.tokens[0, pos] + 7) % 200 + 10
    changed, _ = token_losses(model, b2)
    before = (doc[tgt_pos] < last_doc) | (tgt_pos < pos - 1)  # other docs, and earlier targets
    torch.testing.assert_close(changed[before], base[before], rtol=0, atol=1e-12)
    assert (changed[~before] - base[~before]).abs().max() > 1e-9


def test_loss_only_on_text_targets(setup):
    _, _, model, batch = setup
    out = model(batch, return_token_loss=True)
    n_expected = int((batch.labels != -100).sum())
    assert int(out.n_targets) == n_expected == out.token_loss.numel()
    assert not bool(batch.is_patch[0, 1:][batch.labels[0, :-1] != -100].any())  # no patch is a target
    torch.testing.assert_close(out.ce_loss, out.token_loss.mean())


def test_activation_checkpointing_same_loss_and_grads(setup):
    cfg, _, _, batch = setup
    losses, grads = [], []
    for ckpt in (False, True):
        cfg.model.activation_checkpointing = ckpt
        torch.manual_seed(0)
        m = build_model(cfg.model).double().train()
        out = m(batch)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    cfg.model.activation_checkpointing = False
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(grads[0], grads[1])
