"""Bad configs fail in `python -m pretrain.config` (what launch.sh runs before any rank starts),
each with the key that is wrong named in the message."""
import pytest

from pretrain import config as config_cli
from tests.helpers import REPO, TINY_OVERRIDES, run_launch

DEMO = str(REPO / "pretrain/configs/demo.yaml")

# (overrides, the key the error must name): the list, then the rest of the numeric ranges.
CASES = [
    (["train.lr=0"], "train.lr"),
    (["train.lr=-1e-3"], "train.lr"),
    (["train.grad_clip=-1"], "train.grad_clip"),
    (["train.weight_decay=-0.1"], "train.weight_decay"),
    (["train.beta1=1.5"], "train.beta1"),
    (["train.beta2=1.0"], "train.beta2"),
    (["train.eval_every=0"], "train.eval_every"),
    (["train.warmup_steps=50", "train.max_steps=10"], "train.warmup_steps"),
    (["data.sources=[caption,bogus]", "data.weights=[0.5,0.5]"], "data.sources"),
    (["data.root=/nonexistent/h12b"], "data.root"),
    (["data.tokenizer=/nonexistent/tok.model"], "data.tokenizer"),
    (["model.vocab_size=16"], "model.vocab_size"),
    (["model.kind=moe", "model.moe.backend=cuda_magic"], "model.moe.backend"),
    (["train.keep_checkpoints=-1"], "train.keep_checkpoints"),
    (["train.save_every=-5"], "train.save_every"),
    (["train.save_every=0"], "train.save_every"),
    (["train.eps=0"], "train.eps"),
    (["train.eval_batches=0"], "train.eval_batches"),
    (["train.max_skipped_steps=0"], "train.max_skipped_steps"),
    (["train.stop_after_steps=-1"], "train.stop_after_steps"),
    (["run.log_every=0"], "run.log_every"),
    (["run.name=a/b"], "run.name"),
    (["model.norm_eps=0"], "model.norm_eps"),
    (["model.rope_theta=-1"], "model.rope_theta"),
    (["model.init_std=0"], "model.init_std"),
    (["model.kind=moe", "model.moe.aux_loss_weight=-0.01"], "model.moe.aux_loss_weight"),
    (["model.kind=late", "model.image_size=32", "model.vision.lr_mult=-1"], "model.vision.lr_mult"),
]


@pytest.mark.parametrize("overrides, key", CASES, ids=[" ".join(o) for o, _ in CASES])
def test_bad_config_names_key(overrides, key, tiny_demo, capsys):
    good = [*TINY_OVERRIDES, f"data.root={tiny_demo}"]
    assert config_cli.main([DEMO, *good]) == 0  # the base is valid: the failure is the override's
    capsys.readouterr()
    assert config_cli.main([DEMO, *good, *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error:") and key in err, err


def test_launch_stops_bad_value_before_any_rank(tiny_demo):
    r = run_launch(DEMO, [*TINY_OVERRIDES, f"data.root={tiny_demo}", "train.beta1=1.5"], timeout=120)
    assert r.returncode != 0 and "train.beta1" in r.stderr
    assert "+ " not in r.stdout  # no launcher command was echoed, so none ran
