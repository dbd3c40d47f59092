"""Expert parallelism with DeepSpeed's own machinery: groups, MoE layer registration, optimizer groups.

How DeepSpeed recognises an MoE (deepspeed 0.19, runtime/engine.py, zero/stage_1_and_2.py):
- `engine.has_moe_layers` is set only when some module `isinstance(module, deepspeed.moe.layer.MoE)`
  (or DeepSpeed's AutoEP layer). It switches on everything below, so our layer must BE an `MoE`:
  `DeepSpeedMoEFFN` derives from both our `MoEFFN` (all the computation) and `MoE` (identity for
  the engine); `MoE.__init__` is never run, we set the attributes the engine reads
  (`num_experts`, `ep_size`, `expert_group_name`, `num_local_experts`) and override
  `set_deepspeed_parallelism` (the engine calls it; our groups already exist).
- Expert parameters carry `allreduce = False` and `group_name = "ep_size_<ep>"` (what
  `deepspeed.moe.experts.Experts` sets): `is_moe_param` is true for them, so the engine
  broadcasts them and reduces their gradients only inside the expert-data-parallel group, never
  across experts.
- The ZeRO-1/2 optimizer asserts that the client optimizer's param groups already contain MoE
  groups (`'moe': True`, `name == group_name`): build them with
  `deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer` (`moe_param_groups`
  below). ZeRO then partitions each MoE group over its expert-data-parallel group only, and its
  gradient norm sums every rank's partition once over the world and averages over the
  expert-data-parallel replicas (`_average_expert_grad_norms`), so each expert's norm counts once.
- Checkpoints: `engine.save_checkpoint` writes the non-expert state once and each MoE layer's
  experts to `layer_<l>_expert_<id>_mp_rank_00_model_states.pt`, by matching parameter names
  `...deepspeed_moe.experts.deepspeed_experts.<id>...`. Our experts are stacked tensors, so the
  layer registers its `GroupedExperts` as DeepSpeed "local expert 0" (`num_local_experts = 1`):
  each expert-parallel rank writes one file holding its slice of the stacked weights, with
  id = expert-parallel rank. Reloading at the same expert-parallel size uses DeepSpeed's loader;
  another size is resharded by pretrain/checkpoint/elastic.py.
- ZeRO-3 with this MoE is refused at config validation (RunConfig.validate); DeepSpeed itself
  asserts "MoE not supported with Stage 3" too.

Order in the training loop: deepspeed.init_distributed -> `create_expert_parallel_group(ep)` ->
`build_model(cfg.model, expert_group=...)` -> optimizer over `moe_param_groups(param_groups(...))`
-> deepspeed.initialize.
"""
from __future__ import annotations

from torch import nn

from deepspeed.moe.layer import MoE as _DeepSpeedMoE
from pretrain.models.config import MoEConfig
from pretrain.models.moe import MoEFFN


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's name for the expert groups of size `ep_size` (deepspeed.utils.groups)."""
    return f"ep_size_{ep_size}"


def create_expert_parallel_group(ep_size: int):
    """Create (once) DeepSpeed's expert-parallel and expert-data-parallel groups for `ep_size`;
    return this rank's expert-parallel group. Collective: every rank calls it, in the same order.

    Consecutive ranks form an expert-parallel group ([0, 1], [2, 3], ... for ep 2) and the ranks
    holding the same experts form its expert-data-parallel group ([0, 2, ...], [1, 3, ...]).
    """
    from deepspeed.utils import groups
    import torch.distributed as dist

    world = dist.get_world_size()
    if world % ep_size:
        raise ValueError(f"model.moe.expert_parallel_size={ep_size} does not divide the world size {world}")
    name = expert_group_name(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return groups._get_expert_parallel_group(name)


class _ExpertSlot(nn.Module):
    """The module path DeepSpeed's expert checkpoint code expects:
    `deepspeed_moe.experts.deepspeed_experts.0.<param>`."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.experts = nn.Module()
        self.experts.deepspeed_experts = nn.ModuleList([experts])


class DeepSpeedMoEFFN(MoEFFN, _DeepSpeedMoE):
    """`MoEFFN` registered with the DeepSpeed engine as an MoE layer (see the module docstring)."""

    def __init__(self, width: int, hidden: int, moe: MoEConfig, init_std: float = 0.02,
                 depth: int = 1, expert_group=None, init: bool = True):
        MoEFFN.__init__(self, width, hidden, moe, init_std, depth, expert_group, init=init)
        # Attributes the engine reads from a deepspeed.moe.layer.MoE.
        self.expert_group_name = expert_group_name(self.ep_size)
        self.num_local_experts = 1  # one DeepSpeed checkpoint slot per rank: our stacked experts
        self.enable_expert_tensor_parallelism = False
        experts = self._modules.pop("experts")
        self.deepspeed_moe = _ExpertSlot(experts)
        for p in experts.parameters():
            p.allreduce = False  # -> deepspeed.moe.utils.is_moe_param(p)
            p.group_name = self.expert_group_name

    @property
    def experts(self) -> nn.Module:  # MoEFFN.forward reads self.experts
        return self.deepspeed_moe.experts.deepspeed_experts[0]

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the engine. Groups were created before the model (create_expert_parallel_group)."""
        from deepspeed.utils import groups
        if use_data_before_expert_parallel_:
            raise ValueError("use_data_before_expert_parallel is not supported: the expert groups are "
                             "created before the model with DeepSpeed's default (E + D) layout")
        if self.expert_group_name not in groups._get_expert_parallel_group_dict():
            raise RuntimeError(f"expert group {self.expert_group_name} does not exist; call "
                               "pretrain.models.moe_parallel.create_expert_parallel_group before build_model")


def moe_param_groups(param_groups: list[dict]) -> list[dict]:
    """Split optimizer param groups into dense and MoE groups with DeepSpeed's splitter (each MoE
    group keeps its source group's lr, weight decay, lr_mult); drops groups left empty."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
    groups_ = split_params_into_different_moe_groups_for_optimizer([dict(g) for g in param_groups])
    return [g for g in groups_ if len(g["params"])]


def consolidated_state_dict(ckpt_dir: str) -> dict:
    """One checkpoint step directory of an MoE run, saved at any expert-parallel size, as the
    state dict of the plain model `build_model(cfg)` (fp32 master weights, every expert); see
    pretrain.checkpoint.load_consolidated, which also checks the keys against the config."""
    from pretrain.checkpoint.zero_files import read_full_state

    return read_full_state(ckpt_dir, moments=False).weights
