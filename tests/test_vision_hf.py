"""Loading a Hugging Face vision tower into late fusion's encoder (pretrain/models/vision_hf.py):
a small randomly initialised `CLIPVisionModel` / `SiglipVisionModel` is saved, loaded into ours,
and our encoder's features must equal `transformers`' on the same pixels (fp32), including at
another resolution (interpolated position table against transformers' `interpolate_pos_encoding`).
Mismatched architectures are refused with the overrides to set."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pretrain.accounting import param_counts  # noqa: E402
from pretrain.config import ConfigError, load_config  # noqa: E402
from pretrain.models import build_model  # noqa: E402
from pretrain.models.config import ModelConfig, VisionConfig  # noqa: E402
from pretrain.models.vision_hf import expected_overrides, load_hf_vision  # noqa: E402
from tests.helpers import REPO  # noqa: E402

PATCH, HF_IMAGE = 4, 16
MEAN, STD = [0.40, 0.45, 0.50], [0.20, 0.25, 0.30]  # not ours (0.5, 0.5): the fold is tested


def _save(tmp_path, family: str):
    torch.manual_seed(1)
    common = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  image_size=HF_IMAGE, patch_size=PATCH, num_channels=3)
    if family == "clip":
        hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(hidden_act="quick_gelu", **common))
    else:
        hf = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**common))
    with torch.no_grad():  # HF's init leaves LayerNorms at 1/0 and biases at 0: perturb all of it
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf.eval()
    hf.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": MEAN, "image_std": STD}))
    return hf


def _ours(tmp_path, image_size: int) -> ModelConfig:
    o = expected_overrides(tmp_path)
    v = VisionConfig(**{k.split(".")[-1]: val for k, val in o.items() if k.startswith("model.vision.")},
                     init_from=str(tmp_path))
    return ModelConfig(kind="late", vocab_size=64, width=40, depth=1, head_dim=8, patch_size=PATCH,
                       image_size=image_size, attention_backend="reference", vision=v)


def _patches(u_ICHW: torch.Tensor) -> torch.Tensor:
    """Our pipeline's patches (pretrain/data/images.py): (u - 0.5) / 0.5, row-major patches,
    each flattened channel-first."""
    x = (u_ICHW - 0.5) / 0.5
    I, C, H, W = x.shape
    x = x.reshape(I, C, H // PATCH, PATCH, W // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(-1, C * PATCH * PATCH)


@pytest.mark.parametrize("family", ["clip", "siglip"])
@pytest.mark.parametrize("image_size", [HF_IMAGE, 24])
def test_features_equal_transformers(tmp_path, family, image_size):
    hf = _save(tmp_path, family)
    cfg = _ours(tmp_path, image_size)
    torch.manual_seed(2)
    model = build_model(cfg).eval()
    report = load_hf_vision(model.image_embedder, tmp_path)
    assert report.family == family and report.loaded > 0
    assert any("interpolated" in n for n in report.notes) == (image_size != HF_IMAGE)
    # N_v from the config counts the class token and the missing pre-LN like the built encoder
    assert param_counts(cfg).vision_params == sum(p.numel() for p in model.image_embedder.parameters())
    u = torch.rand(3, 3, image_size, image_size, generator=torch.Generator().manual_seed(3))
    pixel_values = (u - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    with torch.no_grad():
        out = hf(pixel_values=pixel_values, interpolate_pos_encoding=image_size != HF_IMAGE)
        hidden = out.last_hidden_state
        if family == "clip":  # CLIP post-normalises only its pooled class token; we do every patch
            hidden = getattr(hf, "vision_model", hf).post_layernorm(hidden[:, 1:])
        ref = hidden.reshape(-1, hidden.shape[-1])
        ours = model.image_embedder.features(_patches(u))
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    # The connector into the decoder keeps its fresh init; the decoder runs on the loaded tower.
    assert model.image_embedder(_patches(u)).shape == (ref.shape[0], cfg.width)


def test_siglip_pooling_head_is_counted_as_ignored(tmp_path):
    _save(tmp_path, "siglip")
    model = build_model(_ours(tmp_path, HF_IMAGE))
    report = load_hf_vision(model.image_embedder, tmp_path)
    assert report.ignored and all(k.startswith(("vision_model.head.", "head.")) for k in report.ignored)


def test_mismatched_architecture_is_refused_with_the_overrides_to_set(tmp_path):
    _save(tmp_path, "clip")
    cfg = _ours(tmp_path, HF_IMAGE)
    cfg.vision.width, cfg.vision.activation, cfg.vision.class_token = 48, "gelu", False
    with pytest.raises(ValueError) as e:
        load_hf_vision(build_model(cfg).image_embedder, tmp_path)
    msg = str(e.value)
    for want in ("model.vision.width=32", "model.vision.activation=quick_gelu", "model.vision.class_token=True"):
        assert want in msg, msg
    # The same check runs in config validation, before any process starts.
    with pytest.raises(ConfigError, match="model.vision.width=32"):
        load_config(REPO / "pretrain/configs/demo_late.yaml",
                    [f"model.vision.init_from={tmp_path}", "model.patch_size=4", "data.patch_size=4",
                     "model.image_size=16", "data.image_size=16"]).validate()


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    cfg = ModelConfig(kind="late", vocab_size=64, width=40, depth=1, head_dim=8, patch_size=PATCH,
                      image_size=HF_IMAGE, vision=VisionConfig(width=32, depth=1, head_dim=8,
                                                               init_from=str(tmp_path)))
    with pytest.raises(ValueError, match="no config.json"):
        load_hf_vision(build_model(cfg).image_embedder, tmp_path)


def test_full_clip_model_directory_loads_its_vision_tower(tmp_path):
    """A CLIPModel save (text and vision towers, keys prefixed with vision_model.)."""
    torch.manual_seed(4)
    tower = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
    clip = transformers.CLIPModel(transformers.CLIPConfig(
        vision_config=dict(image_size=HF_IMAGE, patch_size=PATCH, hidden_act="quick_gelu", **tower),
        text_config=dict(vocab_size=99, **tower))).eval()
    with torch.no_grad():
        for p in clip.parameters():
            p.add_(0.1 * torch.randn_like(p))
    clip.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": MEAN, "image_std": STD}))
    model = build_model(_ours(tmp_path, HF_IMAGE))
    report = load_hf_vision(model.image_embedder, tmp_path)
    assert any(k.startswith("text_model.") for k in report.ignored)
    u = torch.rand(2, 3, HF_IMAGE, HF_IMAGE)
    pixel_values = (u - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    with torch.no_grad():
        hidden = clip.vision_model(pixel_values=pixel_values).last_hidden_state
        ref = clip.vision_model.post_layernorm(hidden[:, 1:]).reshape(-1, 32)
        ours = model.image_embedder.features(_patches(u))
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
