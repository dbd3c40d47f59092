"""Export (pretrain/export/, tools/export.py): native safetensors and Hugging Face Qwen3 / Qwen3-MoE.

In memory (fast): native export -> reload gives the same module for every model kind; the
Hugging Face directory loads in stock `transformers` with text logits equal to ours (fp32, 1e-4)
for dense and MoE, the remote-code class reproduces our multimodal logits on packed image+text
rows (early, late, MoE), the tokenizer gives sentencepiece's ids; refusals.
From real checkpoints (one pair of spawned DeepSpeed ranks on CPU, three short runs): dense
ZeRO-2, dense ZeRO-3 and MoE with expert parallelism 2 -> tools/export.py -> reload equals the
module the engine trained; the MoE checkpoint also goes to Hugging Face format.
Run:  python -m pytest tests/test_export.py -q
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.helpers import PYTHON, REPO

WORLD = 2
PATCH, IMAGE = 2, 4  # 2x2-pixel patches of 4x4 images: 4 patches per image
EXPERT_SLOT = ".deepspeed_moe.experts.deepspeed_experts.0."


def _model_cfg(kind: str, vocab: int, **over):
    from pretrain.config import RunConfig
    from pretrain.models.config import ModelConfig, MoEConfig, VisionConfig
    cfg = RunConfig()
    cfg.model = ModelConfig(kind=kind, vocab_size=vocab, width=48, depth=2, head_dim=16, ffn_hidden=40,
                            patch_size=PATCH, image_size=IMAGE, norm_eps=1e-6, rope_theta=5000.0,
                            attention_backend="reference",
                            moe=MoEConfig(num_experts=4, top_k=2), vision=VisionConfig(width=24, depth=2, head_dim=8))
    for k, v in over.items():
        setattr(cfg.model, k, v)
    cfg.data.patch_size, cfg.data.image_size, cfg.data.seq_len = PATCH, IMAGE, 64
    return cfg


def _perturbed_model(cfg, seed: int):
    """A model whose norms and biases are not at their init (so a swapped or dropped one shows)."""
    from pretrain.models import build_model
    torch.manual_seed(seed)
    model = build_model(cfg.model).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    return model


def _packed_batch(cfg, seed: int, B: int = 2, T: int = 23, images: bool = True):
    """Rows of several documents; row 0 holds two images (each <boi>, 4 patches, <eoi>)."""
    from pretrain.batch import PackedBatch
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, min(cfg.model.vocab_size, 500), (B, T), generator=g)
    is_patch = torch.zeros(B, T, dtype=torch.bool)
    image_ids = torch.full((B, T), -1, dtype=torch.int32)
    if images:
        for i, start in enumerate((3, 14)):
            is_patch[0, start:start + 4] = True
            image_ids[0, start:start + 4] = i
    doc_ids = torch.zeros(B, T, dtype=torch.int32)
    doc_ids[0, 11:] = 1
    doc_ids[1, 7:] = 1
    doc_ids[1, T - 1] = 2  # a one-token document (padding is its own document)
    pos = torch.zeros(B, T, dtype=torch.int32)
    for b in range(B):
        for t in range(1, T):
            pos[b, t] = 0 if doc_ids[b, t] != doc_ids[b, t - 1] else pos[b, t - 1] + 1
    patches = torch.randn(int(is_patch.sum()), cfg.model.patch_dim, generator=g)
    labels = torch.zeros(B, T, dtype=torch.long)  # a target everywhere: logits at every position
    batch = PackedBatch(tokens, patches, is_patch, doc_ids, image_ids, pos, labels,
                        torch.zeros(B, T, dtype=torch.int8))
    batch.validate()
    return batch


def _our_logits(model, batch):
    with torch.no_grad():
        return model(batch, return_logits=True).target_logits.view(*batch.shape, -1)


def _source(cfg, model, tokenizer):
    from pretrain.export.source import Source
    return Source(cfg, 7, {k: v.clone() for k, v in model.state_dict().items()}, tokenizer, "in-memory")


@pytest.fixture(scope="module")
def tokenizer_path(tiny_demo):
    return str(tiny_demo / json.loads((tiny_demo / "manifest.json").read_text())["tokenizer"])


# -- native --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["early", "late", "moe", "modality_aware"])
def test_native_roundtrip_every_kind(kind, tmp_path, tokenizer_path):
    from pretrain.export import export_native, load_exported, load_model
    cfg = _model_cfg(kind, vocab=520)
    model = _perturbed_model(cfg, seed=1)
    export_native(_source(cfg, model, tokenizer_path), tmp_path)
    assert (tmp_path / "tokenizer.model").read_bytes() == Path(tokenizer_path).read_bytes()
    reloaded = load_exported(tmp_path)
    assert type(reloaded) is type(model)
    ours, theirs = model.state_dict(), reloaded.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    batch = _packed_batch(cfg, seed=2)
    assert torch.equal(_our_logits(model, batch), _our_logits(reloaded, batch))
    loaded = load_model(tmp_path)  # the generic entry point reads exports too
    assert loaded.step == 7 and loaded.tokenizer_path == str(tmp_path / "tokenizer.model")
    assert loaded.config.model == reloaded.cfg


def test_native_bf16_export_holds_rounded_weights(tmp_path):
    from safetensors.torch import load_file

    from pretrain.export import export_native, load_exported
    cfg = _model_cfg("moe", vocab=64)
    model = _perturbed_model(cfg, seed=8)
    export_native(_source(cfg, model, None), tmp_path, dtype=torch.bfloat16)
    assert {v.dtype for v in load_file(str(tmp_path / "model.safetensors")).values()} == {torch.bfloat16}
    got = load_exported(tmp_path).state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(got[k], v.to(torch.bfloat16).float()), k


def test_native_export_rejects_weights_that_do_not_fit(tmp_path):
    from pretrain.export import export_native
    cfg = _model_cfg("early", vocab=64)
    src = _source(cfg, _perturbed_model(cfg, 0), None)
    del src.model_state["blocks.1.attn.qkv.weight"]
    with pytest.raises(ValueError, match=r"missing \['blocks.1.attn.qkv.weight'\]"):
        export_native(src, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


# -- Hugging Face ----------------------------------------------------------------------------------

def _hf_text_logits(out_dir, ids, **kw):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32, **kw).eval()
    with torch.no_grad():
        return hf, hf(ids).logits


@pytest.mark.parametrize("kind,arch", [("early", "Qwen3ForCausalLM"), ("moe", "Qwen3MoeForCausalLM"),
                                       ("late", "Qwen3ForCausalLM")])
def test_hf_text_logits_equal_ours(kind, arch, tmp_path, tokenizer_path):
    from pretrain.export.hf import export_hf
    cfg = _model_cfg(kind, vocab=520)
    model = _perturbed_model(cfg, seed=3)
    export_hf(_source(cfg, model, tokenizer_path), tmp_path)
    for seed, T in ((4, 29), (5, 1)):  # a single token too
        batch = _packed_batch(cfg, seed, T=T, images=False) if T > 1 else None
        if batch is None:
            from pretrain.batch import PackedBatch
            ids = torch.tensor([[17], [2]])
            z = torch.zeros(2, 1, dtype=torch.int32)
            batch = PackedBatch(ids, torch.zeros(0, cfg.model.patch_dim), torch.zeros(2, 1, dtype=torch.bool), z,
                                z - 1, z, torch.zeros(2, 1, dtype=torch.long), z.to(torch.int8))
        # one document per row: plain Qwen3 sees no packing
        batch.doc_ids.zero_()
        batch.position_ids.copy_(torch.arange(batch.shape[1], dtype=torch.int32))
        hf, theirs = _hf_text_logits(tmp_path, batch.tokens)
        assert type(hf).__name__ == arch
        assert (theirs - _our_logits(model, batch)).abs().max().item() <= 1e-4
    if kind == "moe":
        c = hf.config
        assert (c.num_experts, c.num_experts_per_tok, c.norm_topk_prob, c.moe_intermediate_size) == (4, 2, False, 40)
    assert (hf.config.rms_norm_eps, hf.config.head_dim, hf.config.rope_parameters["rope_theta"]) == (1e-6, 16, 5000.0)


@pytest.mark.parametrize("kind", ["early", "late", "moe"])
def test_hf_remote_code_multimodal_logits_equal_ours(kind, tmp_path):
    from transformers import AutoModelForCausalLM

    from pretrain.export.hf import export_hf
    cfg = _model_cfg(kind, vocab=96)
    model = _perturbed_model(cfg, seed=6)
    export_hf(_source(cfg, model, None), tmp_path)
    mm = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32, trust_remote_code=True).eval()
    assert type(mm).__name__.startswith("NativeMM")
    batch = _packed_batch(cfg, seed=7)
    with torch.no_grad():
        theirs = mm(input_ids=batch.tokens, patches=batch.patches, is_patch=batch.is_patch,
                    doc_ids=batch.doc_ids, image_ids=batch.image_ids).logits
    ours = _our_logits(model, batch)
    assert (theirs - ours).abs().max().item() <= 1e-4
    # the pixels matter: other patches, other logits after the image
    with torch.no_grad():
        noise = mm(input_ids=batch.tokens, patches=torch.randn_like(batch.patches), is_patch=batch.is_patch,
                   doc_ids=batch.doc_ids, image_ids=batch.image_ids).logits
    assert (noise[0, 8] - theirs[0, 8]).abs().max() > 1e-3


def test_hf_tokenizer_matches_sentencepiece(tmp_path, tokenizer_path, tiny_demo):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from pretrain.export.hf import export_hf
    cfg = _model_cfg("early", vocab=520)
    export_hf(_source(cfg, _perturbed_model(cfg, 0), tokenizer_path), tmp_path)
    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    texts = (tiny_demo / "tokenizer_train.txt").read_text().splitlines()[:200]  # the corpus it was trained on
    texts += ["  spaces\tand\ttabs \n", " <boi> spelled <eoi> out </s>", "ünïcödé 42 日本 🙂", "", " "]
    for text in texts:
        assert hf(text, add_special_tokens=False)["input_ids"] == sp.encode(text), text
        assert hf.decode(sp.encode(text)) == sp.decode(sp.encode(text))
    assert hf("a red circle")["input_ids"] == [sp.bos_id()] + sp.encode("a red circle")  # BOS like our documents
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (sp.bos_id(), sp.eos_id(), sp.pad_id())
    assert hf.convert_tokens_to_ids(["<boi>", "<eoi>"]) == [sp.piece_to_id("<boi>"), sp.piece_to_id("<eoi>")]
    c = json.loads((tmp_path / "config.json").read_text())
    assert (c["bos_token_id"], c["eos_token_id"], c["pad_token_id"]) == (sp.bos_id(), sp.eos_id(), sp.pad_id())
    assert (c["native_mm"]["boi_token_id"], c["native_mm"]["eoi_token_id"]) == (4, 5)


def test_hf_refuses_modality_aware(tmp_path):
    from pretrain.export.hf import ExportRefused, export_hf
    cfg = _model_cfg("modality_aware", vocab=64)
    with pytest.raises(ExportRefused, match="modality_aware.*--format native"):
        export_hf(_source(cfg, _perturbed_model(cfg, 0), None), tmp_path)
    assert not any(tmp_path.iterdir())


def test_hf_refuses_unknown_model_option():
    """An option the exporter does not know (here a made-up one) set away from its default."""
    import dataclasses

    from pretrain.export.hf import ExportRefused, check_hf_exportable
    from pretrain.models.config import ModelConfig
    Extended = dataclasses.make_dataclass("Extended", [("ffn_activation", str, "silu")], bases=(ModelConfig,))
    cfg = _model_cfg("early", vocab=64)
    cfg.model = Extended(**dataclasses.asdict(cfg.model) | {"vision": cfg.model.vision, "moe": cfg.model.moe})
    check_hf_exportable(cfg)  # at its default: fine
    cfg.model.ffn_activation = "gelu"
    with pytest.raises(ExportRefused, match=r"model.ffn_activation='gelu'.*not known"):
        check_hf_exportable(cfg)


# -- from real DeepSpeed checkpoints ---------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_cfg(case: str, run_dir: str, tokenizer: str):
    kind, zero, ep = {"dense_z2": ("early", 2, 1), "dense_z3": ("early", 3, 1), "moe_ep2": ("moe", 2, 2)}[case]
    cfg = _model_cfg(kind, vocab=520)
    cfg.model.moe.expert_parallel_size = ep
    cfg.model.moe.top_k = 1
    cfg.run.dir, cfg.data.tokenizer = run_dir, tokenizer
    t = cfg.train
    t.zero_stage, t.micro_batch_size, t.global_batch_size = zero, 2, 2 * WORLD
    t.precision, t.lr, t.max_steps, t.warmup_steps = "fp32", 3e-2, 3, 0
    cfg.validate(WORLD)
    return cfg


def _worker(rank: int, port: int, out_dir: str, tokenizer: str) -> None:
    """Three short runs; each saves a checkpoint and this rank's view of the trained module."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu"})
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist

    from pretrain import checkpoint
    from pretrain.config import save_config
    from pretrain.ds_config import build_ds_config
    from pretrain.models import build_model
    from pretrain.models.moe_parallel import create_expert_parallel_group, moe_param_groups
    from pretrain.optim import build_optimizer, param_groups

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    for case in ("dense_z2", "dense_z3", "moe_ep2"):
        run_dir = Path(out_dir) / case
        cfg = _run_cfg(case, str(run_dir), tokenizer)
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir / "config.yaml")
        torch.manual_seed(0)
        group = create_expert_parallel_group(cfg.model.moe.expert_parallel_size) if cfg.model.kind == "moe" else None
        model = build_model(cfg.model, expert_group=group)
        t = cfg.train
        groups = param_groups(model, t.lr, t.weight_decay)
        opt = build_optimizer(moe_param_groups(groups) if group is not None else groups, (t.beta1, t.beta2), t.eps)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=build_ds_config(cfg, WORLD))
        for step in range(t.max_steps):
            out = engine(_packed_batch(cfg, seed=100 * step + rank))
            engine.backward(out.loss)
            engine.step()
        checkpoint.save(engine, run_dir / "checkpoints", t.max_steps, {}, keep=2)
        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=t.zero_stage == 3):
            state = {k: v.detach().clone().float() for k, v in engine.module.state_dict().items()}
        torch.save(state, Path(out_dir) / f"{case}_rank{rank}.pt")
        del engine, opt, model
        dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def trained(tokenizer_path):
    """{case: (run_dir, the plain model's state as trained)} for dense_z2, dense_z3, moe_ep2."""
    out_dir = tempfile.mkdtemp(prefix="export_runs_")
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, out_dir, tokenizer_path)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=400)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    out = {}
    for case in ("dense_z2", "dense_z3", "moe_ep2"):
        by_rank = [torch.load(Path(out_dir) / f"{case}_rank{r}.pt") for r in range(WORLD)]
        state = {}
        for key in by_rank[0]:  # expert slices concatenated in expert-parallel rank order
            if EXPERT_SLOT in key:
                state[key.replace(EXPERT_SLOT, ".experts.")] = torch.cat([s[key] for s in by_rank], dim=0)
            else:
                assert all(torch.equal(s[key], by_rank[0][key]) for s in by_rank), key  # replicated
                state[key] = by_rank[0][key]
        out[case] = (Path(out_dir) / case, state)
    return out


def _export_cli(*args):
    """tools/export.py as a user runs it (a fresh interpreter: nothing of DeepSpeed imported)."""
    return subprocess.run([PYTHON, str(REPO / "tools/export.py"), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def _export_main(capsys, *args) -> tuple[int, str]:
    """tools/export.py's main() in this process (saves an interpreter start per call)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("export_tool", REPO / "tools/export.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    rc = tool.main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out + out.err


@pytest.mark.parametrize("case", ["dense_z2", "dense_z3", "moe_ep2"])
def test_checkpoint_export_reload_equals_trained_module(case, trained, tmp_path, capsys):
    from pretrain.export import load_exported
    from pretrain.models import build_model
    run_dir, expected = trained[case]
    step_dir = run_dir / "checkpoints" / "step_00000003"
    if case == "dense_z2":  # once through a fresh interpreter, as a user runs it
        r = _export_cli("--checkpoint", run_dir, "--out", tmp_path)
        rc, out = r.returncode, r.stdout + r.stderr
    else:
        rc, out = _export_main(capsys, "--checkpoint", step_dir if case == "dense_z3" else run_dir, "--out", tmp_path)
    assert rc == 0, out
    assert re.search(r"exported native model.kind=\w+ step 3", out)
    model = load_exported(tmp_path)
    got = model.state_dict()
    assert got.keys() == expected.keys()
    for k in got:
        assert torch.equal(got[k], expected[k]), k
    init = build_model(model.cfg).state_dict()  # the run moved the weights (the check can fail)
    assert not torch.equal(init["blocks.0.attn.qkv.weight"], got["blocks.0.attn.qkv.weight"])
    # and the function is the trained one
    ref = build_model(model.cfg).eval()
    ref.load_state_dict(expected)
    batch = _packed_batch(_model_cfg(model.cfg.kind, vocab=520), seed=11)
    assert torch.equal(_our_logits(model, batch), _our_logits(ref, batch))


def test_moe_ep2_checkpoint_to_hf(trained, tmp_path, capsys):
    from pretrain.export import load_model
    run_dir, expected = trained["moe_ep2"]
    rc, out = _export_main(capsys, "--checkpoint", run_dir, "--out", tmp_path / "hf", "--format", "hf", "--verify")
    assert rc == 0, out
    assert re.search(r"verify: .* max \|logit difference\| \S+ on a random text row \(ok\)", out), out
    loaded = load_model(run_dir)  # straight from the checkpoint, as generation does
    assert loaded.step == 3 and loaded.config.model.moe.expert_parallel_size == 2
    assert loaded.tokenizer_path and Path(loaded.tokenizer_path).is_file()
    model = loaded.model
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    batch = _packed_batch(_model_cfg("moe", vocab=520), seed=12, images=False)
    batch.doc_ids.zero_()
    batch.position_ids.copy_(torch.arange(batch.shape[1], dtype=torch.int32))
    hf, theirs = _hf_text_logits(tmp_path / "hf", batch.tokens)
    assert type(hf).__name__ == "Qwen3MoeForCausalLM" and hf.config.num_experts_per_tok == 1
    assert (theirs - _our_logits(model, batch)).abs().max().item() <= 1e-4


def test_cli_refuses_modality_aware_and_bad_paths(tmp_path, capsys):
    from pretrain.export import export_native
    cfg = _model_cfg("modality_aware", vocab=64)
    export_native(_source(cfg, _perturbed_model(cfg, 0), None), tmp_path / "native")
    r = _export_cli("--checkpoint", tmp_path / "native", "--out", tmp_path / "hf", "--format", "hf")
    assert r.returncode == 2 and "export refused: model.kind=modality_aware" in r.stderr
    assert not (tmp_path / "hf").exists()
    rc, out = _export_main(capsys, "--checkpoint", tmp_path / "nowhere", "--out", tmp_path / "x")
    assert rc == 1 and "nowhere" in out and not (tmp_path / "x").exists()
