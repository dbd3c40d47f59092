"""tools/generate.py and tools/evaluate.py on an exported model: the CLI gives the tokens the
library gives for the in-memory module, and evaluation writes its results, table and sheet.

    python -m pytest tests/test_generate_cli.py -q
"""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from PIL import Image

from pretrain.data.tokenizer import Tokenizer
from pretrain.generate import GenerationConfig, InferenceModel, generate
from tests.helpers import REPO

import pretrain.export  # noqa: E402,F401 (the export writes the model these tests load)
from tests.test_evaluate_tasks import coco  # noqa: F401 (fixture)
from tests.test_generate import IMAGE, PATCH, tiny_model


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def exported(tiny_demo, tmp_path_factory):
    """A late-fusion model exported with a run config that points at the tiny demo corpus."""
    from pretrain.config import RunConfig
    from pretrain.export import export_native
    from pretrain.export.source import Source

    tok_path = str(tiny_demo / "tokenizer.model")
    model = tiny_model("late", Tokenizer(tok_path).vocab_size, seed=3)
    cfg = RunConfig()
    cfg.model = model.cfg
    cfg.data.root, cfg.data.image_size, cfg.data.patch_size, cfg.data.seq_len = str(tiny_demo), IMAGE, PATCH, 64
    out = tmp_path_factory.mktemp("export")
    export_native(Source(cfg, 11, {k: v.clone() for k, v in model.state_dict().items()}, tok_path, "memory"), out)
    return out, model, tok_path


def test_generate_cli_matches_the_library(exported, tmp_path, capsys):
    out, model, tok_path = exported
    img = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 20, 3), dtype=np.uint8)).save(img)
    assert _tool("generate").main(["--checkpoint", str(out), "--image", str(img), "--image", str(img),
                                   "--text", "the shape is", "--max-new-tokens", "6", "--json",
                                   "--device", "cpu"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    lm = InferenceModel(model, Tokenizer(tok_path), IMAGE, PATCH)
    want = generate(lm, [[img.read_bytes(), "the shape is"]], GenerationConfig(max_new_tokens=6))[0]
    assert [d["token_ids"] for d in lines] == [want.token_ids] * 2
    assert lines[0]["text"] == want.text
    with pytest.raises(SystemExit, match="give --image, --text or --prompts"):
        _tool("generate").main(["--checkpoint", str(out)])


def test_evaluate_cli_caption_and_loss(exported, tiny_demo, tmp_path, capsys):
    out, _, _ = exported
    ev = _tool("evaluate")
    res = tmp_path / "eval"
    assert ev.main(["caption", "--checkpoint", str(out), "--demo-root", str(tiny_demo), "--limit", "5",
                    "--noise", "--max-new-tokens", "4", "--tokenizer", "python", "--out", str(res),
                    "--device", "cpu"]) == 0
    assert ev.main(["loss", "--checkpoint", str(out), "--batches", "1", "--micro-batch-size", "2",
                    "--out", str(res), "--device", "cpu"]) == 0
    results = json.loads((res / "results.json").read_text())
    assert set(results) == {"captioning_real", "captioning_noise", "heldout"}
    assert results["captioning_real"]["examples"] == 5 and results["captioning_noise"]["images"] == "noise"
    assert {"loss/caption", "loss/interleaved", "loss/text", "loss/avg"} <= set(results["heldout"])
    assert len((res / "captioning_real.jsonl").read_text().splitlines()) == 5
    assert (res / "contact_sheet.png").stat().st_size > 0
    assert "CIDEr-D" in capsys.readouterr().out


def test_evaluate_cli_vqa_few_shot(exported, coco, tmp_path, capsys):
    out, _, _ = exported
    res = tmp_path / "eval"
    assert _tool("evaluate").main(["vqa", "--checkpoint", str(out), "--questions", str(coco / "q.json"),
                                   "--annotations", str(coco / "a.json"), "--images", str(coco),
                                   "--image-pattern", "img{image_id}.png", "--shots", "1", "--max-new-tokens", "3",
                                   "--out", str(res), "--device", "cpu"]) == 0
    result = json.loads((res / "results.json").read_text())["vqa_real"]
    records = [json.loads(line) for line in (res / "vqa_real.jsonl").read_text().splitlines()]
    assert result["shots"] == 1 and result["examples"] == 3
    assert result["accuracy"] == pytest.approx(100 * np.mean([r["accuracy"] for r in records]))
    assert "VQA acc. %" in capsys.readouterr().out
