"""Model configuration: the decoder, the late-fusion vision encoder, the mixture of experts.

One dataclass per component, fields documented in place. `ModelConfig.kind` picks the family:
`early` (dense early fusion, the main model), `late` (ViT encoder + decoder), `moe` (sparse early
fusion) and `modality_aware` (one text FFN and one image FFN chosen by `is_patch`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

KINDS = ("early", "late", "moe", "modality_aware")
ATTENTION_BACKENDS = ("auto", "reference", "triton", "flex", "flash_attn")
VIT_ACTIVATIONS = ("gelu", "quick_gelu", "gelu_tanh")


def swiglu_hidden(width: int, multiple_of: int = 256) -> int:
    """8/3 of the width rounded up to a multiple of `multiple_of` (the paper presets' rule)."""
    hidden = (8 * width + 2) // 3
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass
class VisionConfig:
    width: int = 384  # ViT width (late fusion only)
    depth: int = 24  # ViT blocks
    head_dim: int = 64  # ViT attention head size; must divide width
    ffn_hidden: int = 0  # ViT MLP hidden size; 0 -> 4 * width (CLIP-style GELU MLP)
    lr_mult: float = 1.0  # learning-rate multiplier of the encoder (paper Table 8); 0 freezes it
    decay_with_lr_mult: bool = True  # encoder weight decay x lr_mult (same decay per update as the decoder); false: full train.weight_decay
    init_from: str = ""  # local Hugging Face CLIP / SigLIP vision checkpoint to start the encoder from ("" = random init)
    activation: str = "gelu"  # ViT MLP activation: gelu (erf) | quick_gelu (OpenAI CLIP) | gelu_tanh (SigLIP)
    pre_norm: bool = True  # LayerNorm over the embedded patches before the blocks (CLIP's ln_pre; SigLIP has none)
    class_token: bool = False  # prepend a learned class token (CLIP); the decoder never sees its output
    norm_eps: float = 1e-5  # ViT LayerNorm epsilon (CLIP 1e-5, SigLIP 1e-6)


@dataclass
class MoEConfig:
    num_experts: int = 8  # E: SwiGLU experts per MoE layer, each the dense FFN's size
    top_k: int = 1  # experts per token
    aux_loss_weight: float = 0.01  # Switch load-balancing loss weight (averaged over layers)
    z_loss_weight: float = 0.0  # router z-loss weight (0 = off)
    backend: str = "reference"  # expert computation: reference | triton | torch (grouped GEMM)
    expert_parallel_size: int = 1  # ranks the experts are split over (1 = no expert parallelism)


@dataclass
class ModelConfig:
    kind: str = "early"  # early | late | moe | modality_aware
    vocab_size: int = 50432  # rows of the (untied) input and output embeddings; >= tokenizer's
    width: int = 800  # decoder hidden size
    depth: int = 24  # decoder blocks
    head_dim: int = 64  # attention head size; must divide width (multiple of 16, <= 128 for Triton)
    ffn_hidden: int = 0  # SwiGLU hidden size; 0 -> 8/3 * width rounded up to ffn_multiple_of
    ffn_multiple_of: int = 256  # rounding of the default SwiGLU hidden size
    norm_eps: float = 1e-5  # RMSNorm epsilon (blocks and QK-Norm)
    rope_theta: float = 10000.0  # RoPE base
    patch_size: int = 14  # image patch side in pixels (must equal data.patch_size)
    image_size: int = 224  # image side in pixels (must equal data.image_size); sizes late fusion's position table
    image_channels: int = 3  # channels of the patch pixels
    init_std: float = 0.02  # std of the normal init; residual outputs scaled by 1/sqrt(2*depth)
    attention_backend: str = "auto"  # auto | reference | triton | flex | flash_attn
    activation_checkpointing: bool = False  # recompute each block in the backward pass
    vision: VisionConfig = field(default_factory=VisionConfig)  # late fusion encoder
    moe: MoEConfig = field(default_factory=MoEConfig)  # sparse early fusion

    @property
    def n_heads(self) -> int:
        return self.width // self.head_dim

    @property
    def ffn_hidden_size(self) -> int:
        return self.ffn_hidden or swiglu_hidden(self.width, self.ffn_multiple_of)

    @property
    def patch_dim(self) -> int:
        return self.image_channels * self.patch_size ** 2

    @property
    def patches_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"model.kind must be one of {KINDS}, got {self.kind!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"model.attention_backend must be one of {ATTENTION_BACKENDS}, "
                             f"got {self.attention_backend!r}")
        for key in ("vocab_size", "width", "depth", "head_dim", "patch_size"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model.{key} must be positive, got {getattr(self, key)}")
        if self.width % self.head_dim:
            raise ValueError(f"model.head_dim={self.head_dim} does not divide model.width={self.width}")
        if self.head_dim % 2:
            raise ValueError(f"model.head_dim={self.head_dim} must be even (RoPE rotates pairs)")
        if self.kind == "late" and (self.image_size <= 0 or self.image_size % self.patch_size):
            raise ValueError(f"model.image_size={self.image_size} is not a positive multiple of "
                             f"model.patch_size={self.patch_size}")
        if self.kind == "late" and self.vision.width % self.vision.head_dim:
            raise ValueError(f"model.vision.head_dim={self.vision.head_dim} does not divide "
                             f"model.vision.width={self.vision.width}")
        if self.vision.lr_mult < 0:
            raise ValueError(f"model.vision.lr_mult must be >= 0 (0 freezes the encoder), got {self.vision.lr_mult}")
        if self.vision.activation not in VIT_ACTIVATIONS:
            raise ValueError(f"model.vision.activation must be one of {VIT_ACTIVATIONS}, "
                             f"got {self.vision.activation!r}")
        if self.vision.init_from and self.kind != "late":
            raise ValueError(f"model.vision.init_from is set but model.kind={self.kind!r} has no vision encoder")
        if self.kind == "moe":
            m = self.moe
            if m.num_experts < 1 or not 1 <= m.top_k <= m.num_experts:
                raise ValueError(f"model.moe: need 1 <= top_k <= num_experts, got top_k={m.top_k}, "
                                 f"num_experts={m.num_experts}")
            if m.num_experts % m.expert_parallel_size:
                raise ValueError(f"model.moe.expert_parallel_size={m.expert_parallel_size} does not divide "
                                 f"model.moe.num_experts={m.num_experts}")
