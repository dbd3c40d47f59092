"""Parameter counts and FLOPs for every model family, analytic from the config or counted on a model.

Parameter counts (`ParamCounts`, the paper's Table 1 notation):
    params            every parameter (MoE: all E experts of every layer, on all ranks)
    active_params     parameters one token goes through: MoE counts `top_k` experts per layer plus
                      the router; modality-aware counts one of its two FFNs; dense models: params
    decoder_params    N: the active parameters outside the vision encoder, input and output
                      embeddings INCLUDED (early fusion's patch projection too)
    vision_params     N_v: late fusion's ViT and its projection to the decoder width; 0 otherwise
    embedding_params  input embedding + output head (untied: 2 * vocab * width)

The embedding convention is the one that reproduces the paper's Table 6: width 800, depth 24,
vocab 50,432, SwiGLU hidden 2304 gives 194.2M in the blocks, and 275.3M (the table's "275M")
only with both embedding matrices counted (80.7M); without them it would be 194.7M. The same
holds at every width (see tests/test_presets.py). So `N` in `C = 6 N D` includes embeddings.

Training FLOPs, two conventions, both fwd + bwd (= 3 x forward):
- `paper_flops`: the paper's scaling-law compute, `C = 6 N D` (N = decoder_params, the active
  count for MoE; D = decoder token positions) and for late fusion `C = 6 (N_v D_v + N D)` with
  D_v the image-patch tokens. Attention and the embedding lookup are not separated out: the
  paper's convention, used for every scaling-law fit in tools/.
- `training_flops` / `flops_per_token`: model FLOPs for MFU. Every matmul a token actually
  goes through, 2 FLOPs per multiply-add forward and twice that backward (6 per weight):
      decoder blocks      every position (MoE: top_k experts + router)
      lm_head             target positions only (the decoder projects only those)
      image input         image positions only: early fusion's patch projection, or late
                          fusion's whole ViT + projection
      attention           12 * depth * width * ctx per position (QK^T and PV: 2 matmuls x
                          2 FLOPs x 3 for fwd+bwd); ctx = seq_len by default ("full", the PaLM /
                          Megatron / torchtitan convention that ignores mask sparsity), or
                          (seq_len + 1) / 2 with attention="causal" (the mean context of a
                          full-length causal row: a better estimate of the work a causal kernel
                          does; packed short documents do even less). The ViT adds
                          12 * vision_depth * vision_width * patches_per_image per image token
                          (bidirectional, exact).
  Not counted: the input-embedding lookup (no matmul), norms, softmax, activations, RoPE,
  the flash-attention backward's recomputation. `tests/test_accounting.py` checks this count
  against torch's FlopCounterMode on real forward+backward passes.

Command line: python tools/model_stats.py CONFIG [section.key=value ...] --json
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from pretrain.models.config import ModelConfig

# Image-patch share of decoder tokens under the paper's 45-45-10 mixture (appendix C: D_v = 0.544 D).
PAPER_IMAGE_FRACTION = 0.544


@dataclass(frozen=True)
class ParamCounts:
    params: int  # all parameters (MoE: every expert)
    active_params: int  # per-token parameters (MoE: top_k experts + router)
    decoder_params: int  # N: active parameters outside the vision encoder, embeddings included
    vision_params: int  # N_v: late fusion's encoder + projection (0 for other families)
    embedding_params: int  # input embedding + output head

    @property
    def non_embedding_params(self) -> int:
        return self.params - self.embedding_params

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "non_embedding_params": self.non_embedding_params}


# --- analytic counts from the config ---------------------------------------------------------------

def _vit_ffn_hidden(cfg: ModelConfig) -> int:
    return cfg.vision.ffn_hidden or 4 * cfg.vision.width


def _ffn_params(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active) parameters of one block's FFN slot."""
    w, h = cfg.width, cfg.ffn_hidden_size
    swiglu = 3 * w * h
    if cfg.kind == "moe":
        E, k = cfg.moe.num_experts, cfg.moe.top_k
        router = w * E  # Linear(width, E), no bias
        return E * swiglu + router, k * swiglu + router
    if cfg.kind == "modality_aware":
        return 2 * swiglu, swiglu  # a token goes through the text FFN or the image FFN
    return swiglu, swiglu


def _block_params(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active) of one decoder block: 2 RMSNorms, attention (qkv, out, QK-Norm), FFN."""
    w = cfg.width
    fixed = 2 * w + 4 * w * w + 2 * cfg.head_dim
    ffn_total, ffn_active = _ffn_params(cfg)
    return fixed + ffn_total, fixed + ffn_active


def vision_param_count(cfg: ModelConfig) -> int:
    """N_v of late fusion (pretrain/models/vision.py): patch embedding (no bias), position table
    (+1 row and the class embedding with a class token), ln_pre (unless vision.pre_norm=false),
    blocks (LayerNorms, biased qkv/out/fc1/fc2), ln_post, projection (with bias)."""
    if cfg.kind != "late":
        return 0
    v, f = cfg.vision.width, _vit_ffn_hidden(cfg)
    block = 4 * v * v + 2 * v * f + 9 * v + f
    stem = (cfg.patches_per_image + 2 * cfg.vision.class_token) * v + 2 * v * cfg.vision.pre_norm
    return (cfg.patch_dim * v + stem
            + cfg.vision.depth * block + 2 * v + v * cfg.width + cfg.width)


def param_counts(cfg: ModelConfig) -> ParamCounts:
    """Parameter counts of `build_model(cfg)`, from the config alone (no model is built)."""
    w, V = cfg.width, cfg.vocab_size
    embedding = 2 * V * w
    patch_proj = 0 if cfg.kind == "late" else cfg.patch_dim * w + w  # early fusion's Linear with bias
    block_total, block_active = _block_params(cfg)
    rest = embedding + w + patch_proj  # + final norm
    decoder_total = rest + cfg.depth * block_total
    decoder_active = rest + cfg.depth * block_active
    n_v = vision_param_count(cfg)
    return ParamCounts(params=decoder_total + n_v, active_params=decoder_active + n_v,
                       decoder_params=decoder_active, vision_params=n_v, embedding_params=embedding)


# --- counts on an instantiated model ---------------------------------------------------------------

def count_model_params(model: nn.Module) -> ParamCounts:
    """The same counts, summed over `model.named_parameters()`.

    MoE expert tensors are stacked `[n_local_experts, ...]`; under expert parallelism a rank holds
    only its experts, so totals are scaled to all `num_experts` (the global model)."""
    moe_types: tuple = ()
    aware_types: tuple = ()
    try:
        from pretrain.models.moe import ModalityAwareFFN, MoEFFN
        moe_types, aware_types = (MoEFFN,), (ModalityAwareFFN,)
    except ImportError:
        pass
    from pretrain.models.vision import VisionEncoder

    def numel(p: nn.Parameter) -> int:
        return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 partitions leave numel() == 0

    total = active = vision = embedding = 0
    seen: set[int] = set()
    for name, m in model.named_modules():
        if moe_types and isinstance(m, moe_types):
            for p in m.experts.parameters():
                seen.add(id(p))
                total += numel(p) * m.num_experts // m.n_local_experts
                active += numel(p) * m.top_k // m.n_local_experts
        elif aware_types and isinstance(m, aware_types):
            for p in m.image_ffn.parameters():  # the token's other FFN: counted, not active
                seen.add(id(p))
                total += numel(p)
        elif isinstance(m, VisionEncoder):
            for p in m.parameters():
                seen.add(id(p))
                vision += numel(p)
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += numel(p)
        active += numel(p)
        if name in ("embed.weight", "lm_head.weight"):
            embedding += numel(p)
    return ParamCounts(params=total + vision, active_params=active + vision, decoder_params=active,
                       vision_params=vision, embedding_params=embedding)


def model_param_counts(model: nn.Module) -> dict[str, int]:
    """Counts of a built model as a flat dict (what pretrain/train.py logs in summary.json).

    `params` is every parameter, `active_params` the per-token count, `decoder_params` the `N`
    of `C = 6 N D` (pass it, with `vision_params`, to `paper_flops`). `total_params` repeats
    `params` for older readers."""
    counts = count_model_params(model)
    return {**counts.as_dict(), "total_params": counts.params}


# --- FLOPs -----------------------------------------------------------------------------------------

def paper_flops(counts: ParamCounts, tokens: float, image_tokens: float = 0.0) -> float:
    """The paper's training compute: `6 N D` (+ `6 N_v D_v` for late fusion).

    tokens: D, decoder token positions trained on; image_tokens: D_v, image-patch positions
    among them (only late fusion's encoder sees them separately)."""
    return 6.0 * (counts.decoder_params * tokens + counts.vision_params * image_tokens)


def _matmul_weights_per_position(cfg: ModelConfig) -> float:
    """Weights a decoder position multiplies in the blocks (active FFN + attention projections)."""
    w = cfg.width
    _, ffn_active = _ffn_params(cfg)
    return cfg.depth * (4 * w * w + ffn_active)


def _image_input_weights(cfg: ModelConfig) -> float:
    """Matmul weights an image position goes through before the decoder."""
    if cfg.kind != "late":
        return cfg.patch_dim * cfg.width
    v, f = cfg.vision.width, _vit_ffn_hidden(cfg)
    return cfg.patch_dim * v + cfg.vision.depth * (4 * v * v + 2 * v * f) + v * cfg.width


def attention_context(seq_len: int, attention: str) -> float:
    if attention == "full":
        return float(seq_len)
    if attention == "causal":
        return (seq_len + 1) / 2.0
    raise ValueError(f"attention must be 'full' or 'causal', got {attention!r}")


def training_flops(cfg: ModelConfig, seq_len: int, tokens: float, image_tokens: float = 0.0,
                   target_tokens: float | None = None, attention: str = "full") -> float:
    """Model FLOPs (fwd + bwd) of a training pass over `tokens` decoder positions (for MFU).

    image_tokens: patch positions among them; target_tokens: positions with a text target
    (default `tokens - image_tokens`); seq_len: the row length T (attention context). Pass the
    batch's real counts: `tokens = B*T`, `image_tokens = is_patch.sum()`,
    `target_tokens = (labels != -100).sum()`."""
    if target_tokens is None:
        target_tokens = tokens - image_tokens
    ctx = attention_context(seq_len, attention)
    fwd = 2.0 * (_matmul_weights_per_position(cfg) * tokens
                 + cfg.vocab_size * cfg.width * target_tokens
                 + _image_input_weights(cfg) * image_tokens)
    fwd += 4.0 * cfg.depth * cfg.width * ctx * tokens  # QK^T and PV
    if cfg.kind == "late":
        fwd += 4.0 * cfg.vision.depth * cfg.vision.width * cfg.patches_per_image * image_tokens
    return 3.0 * fwd


def flops_per_token(cfg: ModelConfig, seq_len: int, image_fraction: float = 0.0,
                    target_fraction: float | None = None, attention: str = "full") -> float:
    """`training_flops` per decoder position, for a batch whose image-patch share is
    `image_fraction` and target share `target_fraction` (default `1 - image_fraction`)."""
    return training_flops(cfg, seq_len, 1.0, image_fraction, target_fraction, attention)


def model_stats(cfg: ModelConfig, seq_len: int, image_fraction: float = PAPER_IMAGE_FRACTION,
                attention: str = "full") -> dict:
    """Everything tools/model_stats.py prints, analytic from the config."""
    counts = param_counts(cfg)
    return {
        "kind": cfg.kind,
        **counts.as_dict(),
        "seq_len": seq_len,
        "image_fraction": image_fraction,
        "attention": attention,
        "flops_per_token": flops_per_token(cfg, seq_len, image_fraction, attention=attention),
        "paper_flops_per_token": paper_flops(counts, 1.0, image_fraction),
    }
