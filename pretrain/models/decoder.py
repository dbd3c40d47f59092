"""The multimodal decoder shared by early fusion, late fusion and the MoE variants.

    h = embed(tokens);  h[is_patch] = image_embedder(patches)      (the batch contract, docs/architecture.md)
    h = blocks(h) under the packed mask;  loss = next-token CE on text targets only

What differs between the families is plugged in: the image embedder (one linear layer for early
fusion, a ViT + projection for late fusion) and the FFN of each block (SwiGLU, a mixture of
experts, or the modality-aware pair). FFN modules that carry an auxiliary loss (load balancing,
z-loss) set `self.aux_loss` on every forward; the decoder averages those over layers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kernels.attention import attention_ranges
from pretrain.batch import IGNORE_INDEX, PackedBatch
from pretrain.models.config import ModelConfig
from pretrain.models.layers import BatchContext, Block, RMSNorm, init_weights, rope_tables


@dataclass
class ModelOutput:
    loss: torch.Tensor  # what the optimizer minimises: ce_loss + aux_loss
    ce_loss: torch.Tensor  # mean next-token cross-entropy over text targets
    aux_loss: torch.Tensor  # auxiliary losses (MoE balancing, z-loss), already weighted
    n_targets: torch.Tensor  # number of text targets in the batch
    token_loss: torch.Tensor | None = None  # [N] per-target CE, when asked for (evaluation)
    target_source: torch.Tensor | None = None  # [N] source id of each target
    target_logits: torch.Tensor | None = None  # [N, V] logits at target positions, when asked for


class MultimodalDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig, image_embedder: nn.Module,
                 ffn_factory: Callable[[int], nn.Module]):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.image_embedder = image_embedder
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.head_dim, cfg.norm_eps, cfg.attention_backend, ffn_factory(i))
            for i in range(cfg.depth))
        self.final_norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.width, cfg.vocab_size, bias=False)  # untied from `embed`
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_weights(self, self.cfg.init_std, self.cfg.depth)
        # The image embedder initialises itself after the blanket rule: its input is pixels (or
        # a ViT's normalised features), not the residual stream (layers.PatchProjection).
        self.image_embedder.reset_parameters()

    def aux_modules(self) -> list[nn.Module]:
        return [m for m in self.modules() if getattr(m, "aux_loss", None) is not None]

    def embed_inputs(self, batch: PackedBatch) -> torch.Tensor:
        tokens_BT = torch.where(batch.is_patch, torch.zeros_like(batch.tokens), batch.tokens)
        h_BTD = self.embed(tokens_BT)
        if batch.patches.shape[0]:
            img_PD = self.image_embedder(batch.patches.to(h_BTD.dtype))
            h_BTD = h_BTD.masked_scatter(batch.is_patch[..., None], img_PD.to(h_BTD.dtype))
        elif self.training:
            # A micro-batch without images: keep the image embedder on the graph with a zero
            # contribution, so its parameters still get a (zero) gradient. ZeRO reduces
            # gradients in buckets filled by hooks; a rank whose embedder got no gradient posts
            # different collectives than its peers (size mismatch or hang).
            h_BTD = h_BTD + 0.0 * sum(p.sum() for p in self.image_embedder.parameters()).to(h_BTD.dtype)
        return h_BTD

    def hidden_states(self, batch: PackedBatch, kv_cache=None) -> torch.Tensor:
        """The last block's output [B, T, D]. With `kv_cache` (generation, pretrain/generate/)
        the batch holds only the new tokens of a step and attention also reads the cache."""
        cfg = self.cfg
        h_BTD = self.embed_inputs(batch)
        cos, sin = rope_tables(batch.position_ids, cfg.head_dim, cfg.rope_theta)
        # Once, shared by every layer; the cache builds its own mask over the cached sequence.
        ranges = attention_ranges(batch.doc_ids, batch.image_ids) if kv_cache is None else None
        ctx = BatchContext(batch.doc_ids, batch.image_ids, batch.is_patch, cos.to(h_BTD.dtype),
                           sin.to(h_BTD.dtype), ranges, kv_cache)
        for block in self.blocks:
            if cfg.activation_checkpointing and self.training:
                h_BTD = checkpoint(block, h_BTD, ctx, use_reentrant=False)
            else:
                h_BTD = block(h_BTD, ctx)
        return h_BTD

    def forward(self, batch: PackedBatch, return_token_loss: bool = False,
                return_logits: bool = False) -> ModelOutput:
        h_BTD = self.hidden_states(batch)

        # Project only the positions that have a target: patch positions, padding and document
        # ends never reach the vocabulary matmul (a large saving on caption-heavy batches).
        target_mask_BT = batch.labels != IGNORE_INDEX
        h_ND = self.final_norm(h_BTD[target_mask_BT])
        logits_NV = self.lm_head(h_ND).float()
        labels_N = batch.labels[target_mask_BT]
        token_loss_N = F.cross_entropy(logits_NV, labels_N, reduction="none")
        n_targets = labels_N.new_tensor(labels_N.numel())
        ce = token_loss_N.sum() / n_targets.clamp(min=1)

        aux_mods = self.aux_modules()
        aux = (torch.stack([m.aux_loss for m in aux_mods]).mean() if aux_mods
               else ce.new_zeros(()))
        return ModelOutput(
            loss=ce + aux, ce_loss=ce, aux_loss=aux, n_targets=n_targets,
            token_loss=token_loss_N.detach() if return_token_loss else None,
            target_source=batch.source_ids[target_mask_BT] if return_token_loss else None,
            target_logits=logits_NV.detach() if return_logits else None)
