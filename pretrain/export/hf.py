"""Hugging Face export: our decoder as Qwen3 (dense, late fusion) or Qwen3-MoE (sparse).

Why this is exact, field by field (`hf_config`): our block is Qwen3's (pre-norm RMSNorm, fused
q/k/v split into q_proj/k_proj/v_proj with as many KV heads as heads, per-head QK-Norm before
rotate-half RoPE with `inv_freq = theta^(-2i/head_dim)`, scale `head_dim^-0.5`, SwiGLU
`w2(silu(w1 x) * w3 x)` = `down(silu(gate x) * up x)`, no biases, untied output head, one RMSNorm
epsilon everywhere). Our MoE layer is Qwen3-MoE's sparse block with `norm_topk_prob=False`:
fp32 softmax router, top-k, outputs scaled by the raw probabilities; every layer sparse
(`decoder_sparse_step=1`, no `mlp_only_layers`), experts of the dense FFN's size. Equal in fp32;
in bf16, transformers computes the router logits in bf16 where we use fp32, so near-tied routing
choices can differ there.

The image path travels in the same `model.safetensors` under `image_embedder.*` (the patch
projection, or the late-fusion ViT with its projection), with `modeling_native_mm.py` beside it:
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` gives the full multimodal
model; without `trust_remote_code` stock transformers loads the text model and reports the
`image_embedder.*` weights as unused.

Refused (`ExportRefused`, never exported wrong): model.kind=modality_aware (hard routing by
modality has no Qwen3 equivalent), and any model option this exporter does not know set away
from its default (a newer option may change the math).
Run:  python tools/export.py --checkpoint runs/demo --out exports/demo-hf --format hf
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from pretrain.config import RunConfig
from pretrain.export.source import Source, build_from_state

REMOTE_CODE = Path(__file__).with_name("modeling_native_mm.py")

# Model options whose effect this exporter maps (or that do not change the function computed):
# anything else set away from its default is refused. Keep in step with models/config.py.
MAPPED_MODEL_FIELDS = {
    "kind", "vocab_size", "width", "depth", "head_dim", "ffn_hidden", "ffn_multiple_of", "norm_eps",
    "rope_theta", "patch_size", "image_size", "image_channels", "init_std", "attention_backend",
    "activation_checkpointing", "vision", "moe"}
MAPPED_VISION_FIELDS = {"width", "depth", "head_dim", "ffn_hidden", "lr_mult"}
MAPPED_MOE_FIELDS = {"num_experts", "top_k", "aux_loss_weight", "z_loss_weight", "backend",
                     "expert_parallel_size"}


class ExportRefused(ValueError):
    """The model computes something the Hugging Face architecture cannot express."""


def _unknown_options(obj, mapped: set[str], prefix: str) -> list[str]:
    out = []
    for f in dataclasses.fields(obj):
        if f.name in mapped:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if getattr(obj, f.name) != default:
            out.append(f"{prefix}{f.name}={getattr(obj, f.name)!r}")
    return out


def check_hf_exportable(cfg: RunConfig) -> None:
    m = cfg.model
    if m.kind == "modality_aware":
        raise ExportRefused(
            "model.kind=modality_aware cannot be exported to Hugging Face format: each token goes to a "
            "text or an image FFN by its modality, which Qwen3 / Qwen3-MoE cannot express (a Qwen3-MoE "
            "router would choose by content, not by modality). Export it with --format native.")
    if m.kind not in ("early", "late", "moe"):
        raise ExportRefused(f"model.kind={m.kind!r} has no Hugging Face mapping; use --format native")
    unknown = (_unknown_options(m, MAPPED_MODEL_FIELDS, "model.")
               + _unknown_options(m.vision, MAPPED_VISION_FIELDS, "model.vision.")
               + _unknown_options(m.moe, MAPPED_MOE_FIELDS, "model.moe."))
    if unknown:
        raise ExportRefused(
            f"{', '.join(unknown)}: option(s) not known to the Hugging Face exporter "
            f"(pretrain/export/hf.py); refusing rather than exporting a model that may compute "
            f"something else. Use --format native, or teach the exporter the option.")


def hf_config(cfg: RunConfig, special_ids: dict) -> dict:
    m = cfg.model
    common = {
        "vocab_size": m.vocab_size, "hidden_size": m.width, "num_hidden_layers": m.depth,
        "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_heads, "head_dim": m.head_dim,
        "hidden_act": "silu", "rms_norm_eps": m.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": False,
        "use_sliding_window": False, "sliding_window": None,
        # Positions beyond the training row length were never seen (lm-eval reads this).
        "max_position_embeddings": cfg.data.seq_len, "initializer_range": m.init_std,
        "use_cache": True, "dtype": "float32",
        "bos_token_id": special_ids.get("bos_token_id"), "eos_token_id": special_ids.get("eos_token_id"),
        "pad_token_id": special_ids.get("pad_token_id"),
    }
    if m.kind == "moe":
        arch, model_type, remote = "Qwen3MoeForCausalLM", "qwen3_moe", "NativeMMQwen3MoeForCausalLM"
        common.update({
            "num_experts": m.moe.num_experts, "num_experts_per_tok": m.moe.top_k,
            "moe_intermediate_size": m.ffn_hidden_size, "intermediate_size": m.ffn_hidden_size,
            "norm_topk_prob": False, "decoder_sparse_step": 1, "mlp_only_layers": [],
            "output_router_logits": False, "router_aux_loss_coef": m.moe.aux_loss_weight})
    else:
        arch, model_type, remote = "Qwen3ForCausalLM", "qwen3", "NativeMMQwen3ForCausalLM"
        common["intermediate_size"] = m.ffn_hidden_size
    native_mm = {
        "kind": m.kind, "patch_size": m.patch_size, "image_size": m.image_size,
        "image_channels": m.image_channels, "patch_dim": m.patch_dim, "norm_eps": m.norm_eps,
        "boi_token_id": special_ids.get("boi_token_id"), "eoi_token_id": special_ids.get("eoi_token_id"),
        # pixels -> [-1, 1] (pretrain/data/images.py), patches flattened channel-last in raster order
        "image_mean": 0.5, "image_std": 0.5,
    }
    if m.kind == "late":
        v = m.vision
        native_mm["vision"] = {"width": v.width, "depth": v.depth, "head_dim": v.head_dim,
                               "ffn_hidden": v.ffn_hidden or 4 * v.width}
    return {"architectures": [arch], "model_type": model_type, **common,
            "auto_map": {"AutoModelForCausalLM": f"modeling_native_mm.{remote}"},
            "native_mm": native_mm}


def hf_state_dict(cfg: RunConfig, state: dict) -> dict:
    """Our parameter names and layouts -> Qwen3 / Qwen3-MoE's (hub layout: one tensor per expert)."""
    m = cfg.model
    W = m.width
    out = {"model.embed_tokens.weight": state["embed.weight"], "model.norm.weight": state["final_norm.weight"],
           "lm_head.weight": state["lm_head.weight"]}
    for i in range(m.depth):
        ours, hf = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = state[ours + "attn.qkv.weight"].split(W, dim=0)  # rows: q heads, then k, then v
        out.update({
            hf + "input_layernorm.weight": state[ours + "attn_norm.weight"],
            hf + "post_attention_layernorm.weight": state[ours + "ffn_norm.weight"],
            hf + "self_attn.q_proj.weight": q, hf + "self_attn.k_proj.weight": k,
            hf + "self_attn.v_proj.weight": v, hf + "self_attn.o_proj.weight": state[ours + "attn.out.weight"],
            hf + "self_attn.q_norm.weight": state[ours + "attn.q_norm.weight"],
            hf + "self_attn.k_norm.weight": state[ours + "attn.k_norm.weight"]})
        if m.kind == "moe":
            out[hf + "mlp.gate.weight"] = state[ours + "ffn.router.weight"]
            w1, w3, w2 = (state[ours + f"ffn.experts.{n}"] for n in ("w1_EDH", "w3_EDH", "w2_EHD"))
            for e in range(m.moe.num_experts):
                x = f"{hf}mlp.experts.{e}."
                out[x + "gate_proj.weight"] = w1[e].t()  # [D, H] -> nn.Linear's [H, D]
                out[x + "up_proj.weight"] = w3[e].t()
                out[x + "down_proj.weight"] = w2[e].t()
        else:
            out.update({hf + "mlp.gate_proj.weight": state[ours + "ffn.w1.weight"],
                        hf + "mlp.up_proj.weight": state[ours + "ffn.w3.weight"],
                        hf + "mlp.down_proj.weight": state[ours + "ffn.w2.weight"]})
    out.update({k: v for k, v in state.items() if k.startswith("image_embedder.")})
    mapped = {k for k in state if k.startswith("image_embedder.")}
    for i in range(m.depth):
        mapped |= {k for k in state if k.startswith(f"blocks.{i}.")}
    left = set(state) - mapped - {"embed.weight", "final_norm.weight", "lm_head.weight"}
    if left:  # a parameter we would silently drop
        raise ExportRefused(f"parameters with no Hugging Face mapping: {sorted(left)[:5]}")
    return out


def export_hf(src: Source, out: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write a Hugging Face directory for `src`; ExportRefused if the model is not Qwen3-shaped."""
    check_hf_exportable(src.config)
    build_from_state(src.config, src.model_state, src.path)  # the weights fit the config
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    special = {}
    if src.tokenizer_path:
        from pretrain.export.hf_tokenizer import write_hf_tokenizer
        special = write_hf_tokenizer(src.tokenizer_path, out, model_max_length=src.config.data.seq_len)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in hf_state_dict(src.config, src.model_state).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = hf_config(src.config, special)
    config["dtype"] = str(dtype).replace("torch.", "")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {k: special[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in special}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    shutil.copyfile(REMOTE_CODE, out / REMOTE_CODE.name)
    return out


@torch.no_grad()
def verify_hf_export(src: Source, out: str | Path, dtype: torch.dtype = torch.float32, seq_len: int = 32,
                     seed: int = 0) -> float:
    """Max |logit difference| between `transformers` loading `out` and our module with the same
    (`dtype`-rounded) weights on a random text row, both computing in fp32 on the CPU. Needs the
    memory of two copies of the model."""
    from transformers import AutoModelForCausalLM

    from pretrain.batch import PackedBatch
    rounded = {k: v.to(dtype).float() if v.is_floating_point() else v for k, v in src.model_state.items()}
    model = build_from_state(src.config, rounded, src.path)
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    T = min(seq_len, src.config.data.seq_len)
    ids_1T = torch.randint(0, src.config.model.vocab_size, (1, T), generator=torch.Generator().manual_seed(seed))
    zeros = torch.zeros(1, T, dtype=torch.int32)
    batch = PackedBatch(ids_1T, torch.zeros(0, src.config.model.patch_dim), torch.zeros(1, T, dtype=torch.bool),
                        zeros, zeros - 1, torch.arange(T, dtype=torch.int32)[None], torch.zeros(1, T, dtype=torch.long),
                        zeros.to(torch.int8))
    ours_TV = model(batch, return_logits=True).target_logits
    return float((hf(ids_1T).logits[0] - ours_TV).abs().max())
