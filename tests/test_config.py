"""Config system: typed sections, dotted overrides, nearest-name errors, DeepSpeed config."""
import json

import pytest

from pretrain.config import ConfigError, load_config
from pretrain.ds_config import build_ds_config
from tests.helpers import REPO, run_launch

DEMO = str(REPO / "pretrain/configs/demo.yaml")


def test_overrides_are_typed_and_applied():
    cfg = load_config(DEMO, ["train.max_steps=7", "train.warmup_steps=2", "model.width=256", "train.lr=1e-3",
                             "data.weights=[0.5,0.3,0.2]", "run.wandb=false"])
    assert cfg.train.max_steps == 7 and isinstance(cfg.train.max_steps, int)
    assert cfg.model.width == 256
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.data.weights == [0.5, 0.3, 0.2]
    assert cfg.run.wandb is False


@pytest.mark.parametrize("override, suggestion", [
    ("train.max_stepz=3", "train.max_steps"),
    ("modle.width=3", "model"),
    ("model.widht=3", "model.width"),
    ("data.seq_lenn=3", "data.seq_len"),
])
def test_unknown_key_names_nearest(override, suggestion):
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, [override])
    assert suggestion in str(e.value)


def test_unknown_key_in_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  gloabl_batch_size: 8\n")
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        load_config(p)


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config(DEMO, ["train.max_steps=ten"])


def test_batch_sizes_must_divide():
    with pytest.raises(ConfigError, match="global_batch_size"):
        load_config(DEMO, ["train.global_batch_size=10", "train.micro_batch_size=4"])
    cfg = load_config(DEMO, ["train.global_batch_size=16", "train.micro_batch_size=4"])
    cfg.validate(world_size=4)
    with pytest.raises(ConfigError, match="world_size"):
        cfg.validate(world_size=3)


def test_ds_config_from_yaml_and_auto_rejected(tmp_path):
    cfg = load_config(DEMO, ["train.global_batch_size=32", "train.micro_batch_size=4", "train.zero_stage=1"])
    ds = build_ds_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 32 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 4 and ds["zero_optimization"]["stage"] == 1
    assert ds["gradient_clipping"] == 1.0
    base = json.loads((REPO / "ds_configs/zero1.json").read_text())
    base["zero_optimization"]["reduce_bucket_size"] = "auto"
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps(base))
    cfg = load_config(DEMO, [f"train.ds_base={bad}", "train.zero_stage=1"])
    with pytest.raises(ValueError, match="reduce_bucket_size"):
        build_ds_config(cfg, world_size=1)


def test_launch_rejects_bad_config_before_starting_ranks():
    r = run_launch(DEMO, ["train.max_stepz=3"], timeout=120)
    assert r.returncode != 0
    assert "train.max_steps" in r.stderr
    assert "deepspeed" not in r.stdout  # the launcher command is never echoed nor run
    r = run_launch(DEMO, ["train.global_batch_size=6", "train.micro_batch_size=2"], timeout=120)
    assert r.returncode != 0 and "global_batch_size" in r.stderr
