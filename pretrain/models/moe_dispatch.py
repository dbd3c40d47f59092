"""Expert-parallel exchange for the dropless MoE: counts first, then rows by all-to-all, and back.

With an expert-parallel group of size `ep`, rank r holds experts [r·E_l, (r+1)·E_l), E_l = E/ep.
Each rank arrives with its rows already sorted by global expert (moe.py), so the rows bound for
rank s are one contiguous block and `all_to_all_single` with variable splits moves them:

    1. counts:  all_to_all_single(tokens_per_expert_E)  -> recv_counts_SE[s, j] = rows rank s sends
                for my local expert j   (equal splits of E_l counts; tiny)
    2. one host sync for the split sizes (all_to_all_single takes Python lists)
    3. rows:    all_to_all_single(x_sorted_ND, recv sizes, send sizes); arrive grouped by source
                rank, then by local expert -> stable-sort by local expert -> grouped GEMM experts
    4. back:    un-sort, all_to_all_single with the splits swapped; the caller un-permutes.

Both row exchanges are autograd functions whose backward is the reverse exchange, so every rank
runs the same collectives in the same order in forward and backward, whatever it routed: a rank
that sends or receives zero rows for some (or all) experts still joins each collective with
empty blocks, which is what keeps skewed routing and text-only micro-batches from hanging.

Tested in tests/test_moe_parallel.py (two gloo ranks on CPU).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with variable splits; backward sends gradients back the same way."""

    @staticmethod
    def forward(ctx, x_ND, output_splits: list[int], input_splits: list[int], group):
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        out_ND = x_ND.new_empty((sum(output_splits),) + tuple(x_ND.shape[1:]))
        dist.all_to_all_single(out_ND, x_ND.contiguous(), output_splits, input_splits, group=group)
        return out_ND

    @staticmethod
    def backward(ctx, grad_ND):
        grad_in_ND = grad_ND.new_empty((sum(ctx.input_splits),) + tuple(grad_ND.shape[1:]))
        dist.all_to_all_single(grad_in_ND, grad_ND.contiguous(), ctx.input_splits, ctx.output_splits,
                               group=ctx.group)
        return grad_in_ND, None, None, None


def all_to_all(x_ND: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(x_ND, output_splits, input_splits, group)


def expert_parallel_apply(experts, x_sorted_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor,
                          group, ep_size: int) -> torch.Tensor:
    """Run `experts` (this rank's E/ep local experts) on rows owned by experts anywhere in `group`.

    x_sorted_ND: this rank's rows sorted by global expert; tokens_per_expert_E: rows per global
    expert (sums to N). Returns the expert outputs in the same row order as x_sorted_ND.
    """
    E = tokens_per_expert_E.numel()
    E_local = E // ep_size
    # 1. Counts: block s of tokens_per_expert_E (experts of rank s) goes to rank s.
    send_counts_E = tokens_per_expert_E.contiguous()
    recv_counts_E = torch.empty_like(send_counts_E)
    dist.all_to_all_single(recv_counts_E, send_counts_E, group=group)
    recv_counts_SE = recv_counts_E.view(ep_size, E_local)  # [source rank, local expert]

    # 2. Split sizes on the host, both lists in one transfer.
    send_S = send_counts_E.view(ep_size, E_local).sum(1)
    input_splits, output_splits = torch.stack([send_S, recv_counts_SE.sum(1)]).tolist()

    # 3. Rows out; regroup by local expert (stable: source-rank order kept inside an expert).
    x_recv_RD = all_to_all(x_sorted_ND, output_splits, input_splits, group)
    n_recv = x_recv_RD.shape[0]
    local_expert_R = torch.arange(E_local, device=recv_counts_E.device).repeat(ep_size).repeat_interleave(
        recv_counts_E, output_size=n_recv)
    order_R = torch.argsort(local_expert_R, stable=True)
    tokens_per_local_expert_E = recv_counts_SE.sum(0)
    y_local_RD = experts(x_recv_RD.index_select(0, order_R), tokens_per_local_expert_E)
    y_recv_RD = torch.zeros_like(y_local_RD).index_copy(0, order_R, y_local_RD)

    # 4. Rows back to the ranks that own the tokens.
    return all_to_all(y_recv_RD, input_splits, output_splits, group)
