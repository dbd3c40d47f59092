"""Sparse FFNs: the dropless top-k mixture of SwiGLU experts and the modality-aware pair.

`MoEFFN` (model.kind: moe) replaces a block's SwiGLU with `E` SwiGLU experts of the dense FFN's
size and a learned, modality-agnostic router (Shukor et al. 2025, §4: E = 8, top-1, Switch
balancing loss with weight 0.01). One forward, with `T` tokens, `k` experts per token, `N = T·k`
token-expert assignments:

    logits_TE = x_TD @ W_router^T                     (fp32: bf16 logits flip top-1 choices)
    probs_TE  = softmax(logits_TE);  top-k -> (probs_TK, expert_ids_TK)
    sort the N assignments by expert (stable argsort: deterministic, no atomics)
    gather rows into expert order, tokens_per_expert_E = count_ids(expert_ids_N, E)
    [expert parallelism: counts, then rows, exchanged by all_to_all_single; see moe_dispatch.py]
    h = silu(x W1_e) * (x W3_e);  y = h W2_e          (kernels/grouped_swiglu.py, grouped_gemm.py)
    un-permute, scale each row by its router probability, sum the k rows of each token

Decisions, written down:
- Dropless: no capacity factor; every token is processed by exactly k experts, however skewed.
- The output is scaled by the raw softmax probability of the chosen expert(s). For k = 1 this is
  what gives the router a gradient (renormalising would make the scale 1). For k > 1 we do NOT
  renormalise the k probabilities to sum to 1 (Switch/GShard-style scaling rather than Mixtral's),
  so k = 1 and k > 1 share one code path and the router always sees the probability mass it gave.
- Balancing loss (Switch, Fedus et al. 2021): `E · Σ_i f_i P_i`, f_i the fraction of the N
  assignments routed to expert i, P_i the mean router probability of expert i over the T tokens.
  It is 1.0 for perfectly uniform routing and larger otherwise. Computed on the tokens this rank
  sees (every token, padding included), as in Switch; weighted by `aux_loss_weight`.
- Router z-loss (ST-MoE): `mean_T(logsumexp(logits_TE)^2)`, weighted by `z_loss_weight`.
- `self.aux_loss` holds the weighted sum (on the graph; the decoder averages it over layers), or
  None when both weights are 0.
- Expert weights are stacked tensors `w1_EDH, w3_EDH, w2_EHD` holding this rank's experts (all E
  without expert parallelism), so the grouped GEMM reads them directly. They are initialised per
  *global* expert from a generator seeded by (layer seed, expert id): the model is the same
  function of the seed whatever the expert-parallel size (`reset_expert_parameters`).

Statistics: after each forward `last_counts_E2` holds the detached token counts per global expert,
column 0 text tokens and column 1 image tokens (no host sync). In training mode counts, the balance
loss and the z-loss are also accumulated until `moe_metrics(model)` reads and resets them, so the
logged load covers every micro-batch of the logging window, not just the last one.

Run the unit tests:  python -m pytest tests/test_moe.py -q
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kernels.grouped_gemm import grouped_gemm
from kernels.grouped_swiglu import grouped_swiglu
from pretrain.expert_scores import specialization_score
from pretrain.models.config import MoEConfig
from pretrain.models.layers import SwiGLU


def _in_backward() -> bool:
    """True while autograd runs a backward pass (activation-checkpoint recomputation): statistics
    must not be counted twice."""
    return torch._C._current_graph_task_id() != -1


def count_ids(ids_N: torch.Tensor, n: int) -> torch.Tensor:
    """How many times each of 0..n-1 occurs in ids_N, as int64 [n], without a host sync
    (torch.bincount reads max() on the host on CUDA). Integer adds: deterministic."""
    return torch.zeros(n, dtype=torch.long, device=ids_N.device).index_add_(0, ids_N, torch.ones_like(ids_N))


def route(x_TD: torch.Tensor, router_weight_ED: torch.Tensor, top_k: int):
    """fp32 router: returns logits_TE, probs_TE, the top-k probabilities and expert ids [T, k]."""
    logits_TE = F.linear(x_TD.float(), router_weight_ED.float())
    probs_TE = torch.softmax(logits_TE, dim=-1)
    probs_TK, expert_ids_TK = torch.topk(probs_TE, top_k, dim=-1)
    return logits_TE, probs_TE, probs_TK, expert_ids_TK


def balance_loss(probs_TE: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """Switch load-balancing loss `E · Σ_i f_i P_i` (1.0 when routing is perfectly uniform)."""
    E = probs_TE.shape[-1]
    f_E = tokens_per_expert_E.float() / tokens_per_expert_E.sum().clamp(min=1).float()
    P_E = probs_TE.mean(dim=0) if probs_TE.shape[0] else probs_TE.new_zeros(E)
    return E * (f_E * P_E).sum()


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss `mean(logsumexp(logits)^2)`: keeps router logits small (fp32 stability)."""
    if logits_TE.shape[0] == 0:
        return logits_TE.new_zeros(())
    return torch.logsumexp(logits_TE, dim=-1).pow(2).mean()


class GroupedExperts(nn.Module):
    """`n_local` SwiGLU experts as stacked weights; rows arrive grouped by expert."""

    def __init__(self, n_local: int, width: int, hidden: int, backend: str):
        super().__init__()
        self.backend = backend
        self.w1_EDH = nn.Parameter(torch.empty(n_local, width, hidden))
        self.w3_EDH = nn.Parameter(torch.empty(n_local, width, hidden))
        self.w2_EHD = nn.Parameter(torch.empty(n_local, hidden, width))
        for p in (self.w1_EDH, self.w3_EDH, self.w2_EHD):
            p.expert_init = True  # layers.init_weights leaves these to MoEFFN.reset_expert_parameters

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        # backend "triton": w1 and w3 in one fused kernel (one read of x, SwiGLU in its epilogue)
        # reading the two parameters as they are; other backends compose two grouped GEMMs.
        h_NH = grouped_swiglu(x_ND, self.w1_EDH, self.w3_EDH, tokens_per_expert_E, backend=self.backend)
        return grouped_gemm(h_NH, self.w2_EHD, tokens_per_expert_E, backend=self.backend)


class MoEFFN(nn.Module):
    """Dropless top-k mixture of SwiGLU experts; drop-in for the FFN slot of `Block`.

    expert_group: the expert-parallel process group (None: this rank holds every expert). Its
    size must divide `num_experts`; rank r of the group holds experts [r·E/ep, (r+1)·E/ep).
    """

    def __init__(self, width: int, hidden: int, moe: MoEConfig, init_std: float = 0.02,
                 depth: int = 1, expert_group=None, init: bool = True):
        # nn.Module.__init__ explicitly (not super()): the DeepSpeed-registered subclass in
        # moe_parallel.py also derives from deepspeed.moe.layer.MoE, whose __init__ must not run.
        nn.Module.__init__(self)
        self.width, self.hidden = width, hidden
        self.num_experts, self.top_k = moe.num_experts, moe.top_k
        self.aux_loss_weight, self.z_loss_weight = moe.aux_loss_weight, moe.z_loss_weight
        self.init_std, self.depth = init_std, depth
        self.expert_group = expert_group
        self.ep_size, self.ep_rank = 1, 0
        if expert_group is not None:
            import torch.distributed as dist
            self.ep_size, self.ep_rank = dist.get_world_size(expert_group), dist.get_rank(expert_group)
        if self.num_experts % self.ep_size:
            raise ValueError(f"expert-parallel size {self.ep_size} does not divide num_experts={self.num_experts}")
        self.n_local_experts = self.num_experts // self.ep_size
        self.router = nn.Linear(width, self.num_experts, bias=False)
        self.experts = GroupedExperts(self.n_local_experts, width, hidden, moe.backend)
        self.aux_loss: torch.Tensor | None = None
        self.last_counts_E2: torch.Tensor | None = None  # [E, 2] text / image tokens, last forward
        self.reset_stats()
        if init:  # inside a decoder, layers.init_weights calls reset_expert_parameters itself
            self.reset_expert_parameters()

    # -- initialisation -------------------------------------------------------------------------
    @torch.no_grad()
    def reset_expert_parameters(self, seed: int | None = None) -> None:
        """Normal(0, std) per global expert, w2 scaled by 1/sqrt(2·depth) like the dense FFN.

        One draw from the global RNG gives the layer's seed (the same number of draws whatever
        the expert-parallel size), then expert e uses its own generator seeded by (seed, e), so
        rank r initialises exactly the slice that a single-rank model would hold for its experts.
        layers.init_weights skips these parameters (flag `expert_init`) and calls this instead.
        """
        if self.experts.w1_EDH.is_meta:  # a shapes-only model (checkpoint key checks): no values
            return
        if seed is None:
            seed = int(torch.randint(0, 2 ** 40, (), dtype=torch.int64))
        first = self.ep_rank * self.n_local_experts
        resid_std = self.init_std / math.sqrt(2 * self.depth)
        for name in ("w1_EDH", "w3_EDH", "w2_EHD"):
            p = getattr(self.experts, name)
            std = resid_std if name == "w2_EHD" else self.init_std
            for e_local in range(self.n_local_experts):
                g = torch.Generator(device="cpu").manual_seed(seed * 4096 + 3 * (first + e_local)
                                                               + ("w1_EDH", "w3_EDH", "w2_EHD").index(name))
                w = torch.empty(p.shape[1:], dtype=torch.float32).normal_(0.0, std, generator=g)
                p[e_local].copy_(w.to(p.device, p.dtype))

    # -- statistics -----------------------------------------------------------------------------
    def reset_stats(self) -> None:
        self._sum_counts_E2 = None  # accumulated counts since the last moe_metrics()
        self._sum_balance = None
        self._sum_z = None
        self._n_forwards = 0

    @torch.no_grad()
    def _record(self, counts_E2: torch.Tensor, bal: torch.Tensor, z: torch.Tensor) -> None:
        self.last_counts_E2 = counts_E2
        if not self.training or _in_backward():
            return
        if self._sum_counts_E2 is None:
            self._sum_counts_E2 = torch.zeros_like(counts_E2)
            self._sum_balance = torch.zeros((), device=bal.device)
            self._sum_z = torch.zeros((), device=bal.device)
        self._sum_counts_E2 += counts_E2
        self._sum_balance += bal.detach()
        self._sum_z += z.detach()
        self._n_forwards += 1

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x_BTD: torch.Tensor, is_patch_BT: torch.Tensor | None = None) -> torch.Tensor:
        shape = x_BTD.shape
        x_TD = x_BTD.reshape(-1, shape[-1])
        T, E, k = x_TD.shape[0], self.num_experts, self.top_k

        logits_TE, probs_TE, probs_TK, expert_ids_TK = route(x_TD, self.router.weight, k)

        # Sort the N = T·k assignments by expert. A stable sort keeps token order inside each
        # expert, so the permutation (and everything after it) is deterministic.
        expert_ids_N = expert_ids_TK.reshape(-1)
        order_N = torch.argsort(expert_ids_N, stable=True)
        token_of_N = order_N // k  # source token of each sorted row
        tokens_per_expert_E = count_ids(expert_ids_N, E)
        if self.ep_size > 1:
            from pretrain.models.moe_dispatch import SplitSizes, expert_parallel_apply
            # Start the count exchange first: the host waits for the split sizes only after the
            # row gather below is queued (moe_dispatch.py: the layer's one host sync).
            splits = SplitSizes(tokens_per_expert_E, self.expert_group, self.ep_size)
        x_sorted_ND = x_TD.index_select(0, token_of_N)

        if self.ep_size > 1:
            y_sorted_ND = expert_parallel_apply(self.experts, x_sorted_ND, splits, self.expert_group)
        else:
            y_sorted_ND = self.experts(x_sorted_ND, tokens_per_expert_E)

        # Un-permute: row i of the sorted order belongs to assignment order_N[i]. index_copy with
        # a permutation writes every slot exactly once (deterministic; its backward is a gather).
        y_ND = torch.zeros_like(y_sorted_ND).index_copy(0, order_N, y_sorted_ND)
        y_TKD = y_ND.view(T, k, shape[-1])
        out_TD = (y_TKD.float() * probs_TK.unsqueeze(-1)).sum(dim=1).to(x_BTD.dtype)

        # Auxiliary losses and statistics.
        bal = balance_loss(probs_TE, tokens_per_expert_E)
        z = router_z_loss(logits_TE)
        aux = None
        if self.aux_loss_weight:
            aux = self.aux_loss_weight * bal
        if self.z_loss_weight:
            aux = self.z_loss_weight * z if aux is None else aux + self.z_loss_weight * z
        self.aux_loss = aux
        with torch.no_grad():
            if is_patch_BT is None:
                is_patch_N = torch.zeros_like(expert_ids_N)
            else:
                is_patch_N = is_patch_BT.reshape(-1).long().repeat_interleave(k)
            counts_E2 = count_ids(expert_ids_N * 2 + is_patch_N, 2 * E).view(E, 2)
            self._record(counts_E2, bal, z)
        return out_TD.view(shape)


class ModalityAwareFFN(nn.Module):
    """Modality-aware baseline (paper §4.3): text tokens go to `text_ffn`, image patches to
    `image_ffn` (hard routing by `is_patch`, no router, no auxiliary loss). Selecting the rows
    syncs the host once per layer (nonzero); a baseline, not the fast path."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.text_ffn = SwiGLU(width, hidden)
        self.image_ffn = SwiGLU(width, hidden)
        self.aux_loss = None

    def forward(self, x_BTD: torch.Tensor, is_patch_BT: torch.Tensor | None = None) -> torch.Tensor:
        if is_patch_BT is None:
            return self.text_ffn(x_BTD)
        x_TD = x_BTD.reshape(-1, x_BTD.shape[-1])
        is_patch_T = is_patch_BT.reshape(-1)
        img_idx = is_patch_T.nonzero().squeeze(1)
        txt_idx = (~is_patch_T).nonzero().squeeze(1)
        out_TD = torch.empty_like(x_TD)
        # Each FFN sees only its own rows (no wasted FLOPs); every row is written exactly once.
        out_TD = out_TD.index_copy(0, txt_idx, self.text_ffn(x_TD.index_select(0, txt_idx)))
        out_TD = out_TD.index_copy(0, img_idx, self.image_ffn(x_TD.index_select(0, img_idx)))
        return out_TD.view(x_BTD.shape)


def moe_layers(model: nn.Module) -> list[MoEFFN]:
    return [m for m in model.modules() if isinstance(m, MoEFFN)]


@torch.no_grad()
def moe_metrics(model: nn.Module, reset: bool = True, all_reduce: bool = False,
                group=None) -> dict[str, float]:
    """Router statistics since the last call, as flat floats for metrics.jsonl.

    Keys (layer index l counts MoE layers from the input side, e global expert id):
      moe/balance_loss             unweighted Switch loss, mean over layers and forwards
      moe/z_loss                   unweighted router z-loss, same averaging
      moe/load_max_over_min        max over layers of (max expert load / max(min load, 1 token))
      moe/specialization           mean over layers and experts with tokens of 1 - H(image share)
                                   (paper §4.4; pretrain.scaling.specialization)
      moe/l{l}/load_e{e}           fraction of the layer's assignments routed to expert e
      moe/l{l}/image_share_e{e}    fraction of expert e's tokens that are image patches
      moe/l{l}/max_over_min        that layer's max/min load ratio
    Counts cover every training forward since the last reset (or, if there were none, the last
    forward). all_reduce=True sums counts over `group` (default: the world) first: then every
    rank must call it (a collective), and the logged load is the global one.
    """
    layers = moe_layers(model)
    if not layers:
        return {}
    counts, bals, zs = [], [], []
    for m in layers:
        if m._n_forwards:
            counts.append(m._sum_counts_E2.double())
            bals.append(m._sum_balance.double() / m._n_forwards)
            zs.append(m._sum_z.double() / m._n_forwards)
        elif m.last_counts_E2 is not None:
            counts.append(m.last_counts_E2.double())
            bals.append(torch.zeros((), dtype=torch.float64, device=m.last_counts_E2.device))
            zs.append(torch.zeros_like(bals[-1]))
        else:
            return {}
    counts_LE2 = torch.stack(counts)
    bal_L, z_L = torch.stack(bals), torch.stack(zs)
    if all_reduce:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            n = dist.get_world_size(group)
            dist.all_reduce(counts_LE2, group=group)
            dist.all_reduce(bal_L, group=group)
            dist.all_reduce(z_L, group=group)
            bal_L, z_L = bal_L / n, z_L / n
    if reset:
        for m in layers:
            m.reset_stats()
    counts_LE2 = counts_LE2.cpu()
    load_LE = counts_LE2.sum(-1)
    frac_LE = load_LE / load_LE.sum(-1, keepdim=True).clamp(min=1)
    img_share_LE = counts_LE2[..., 1] / load_LE.clamp(min=1)
    ratio_L = load_LE.max(-1).values / load_LE.min(-1).values.clamp(min=1)
    # The paper's score, computed as the analysis tool does (experts without tokens left out).
    spec_L = specialization_score(counts_LE2.numpy())
    out = {
        "moe/balance_loss": float(bal_L.mean()),
        "moe/z_loss": float(z_L.mean()),
        "moe/load_max_over_min": float(ratio_L.max()),
        "moe/specialization": float(np.nanmean(spec_L)) if np.isfinite(spec_L).any() else float("nan"),
    }
    L, E = frac_LE.shape
    for l in range(L):
        out[f"moe/l{l}/max_over_min"] = float(ratio_L[l])
        for e in range(E):
            out[f"moe/l{l}/load_e{e}"] = float(frac_LE[l, e])
            out[f"moe/l{l}/image_share_e{e}"] = float(img_share_LE[l, e])
    return out
