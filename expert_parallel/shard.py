"""``shard_moe``: turn an already-built ``moe.MoE`` (or every one inside a model) into its expert-parallel form.

Applied after construction, gpt-fast style: the router and shared expert stay replicated, ``experts`` is
replaced by an ``Experts`` holding only this rank's slots (copies of the logical experts the placement puts
there), and ``dispatcher`` by an EP dispatcher over the process group. The math stays in ``moe/``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from all_to_all.allgather import AllGatherDispatcher
from all_to_all.alltoall import AllToAllDispatcher
from all_to_all.comm import EPComm
from expert_parallel.placement import ExpertPlacement
from moe.layer import MoE

DispatcherKind = Literal["all_to_all", "all_gather"]
PlacementArg = ExpertPlacement | Mapping[str, ExpertPlacement] | None


def shard_moe(module: nn.Module, group: dist.ProcessGroup | None = None, *, placement: PlacementArg = None,
              dispatcher: DispatcherKind = "all_to_all", timeout_s: float = 60.0,
              max_tokens: int | None = None) -> nn.Module:
    """Shard every ``moe.MoE`` in ``module`` (``module`` itself included) over ``group``, in place; returns it.

    Every rank must call this with the same full model (same weights) and the same arguments.

    - ``placement``: ``None`` (linear: rank ``r`` holds experts ``r*E/W ..``), one ``ExpertPlacement`` for all
      layers, or a mapping from module name (``""`` for ``module`` itself) to a placement. Redundant slots
      copy their logical expert's weights.
    - ``dispatcher``: ``"all_to_all"`` (exact-size exchange; one host sync for the split sizes) or
      ``"all_gather"`` (static shapes; ``max_tokens`` fixes the padded tokens per rank).
    - ``timeout_s``: a collective that fails or hangs (a dead rank) raises
      :class:`all_to_all.CollectiveError`, naming the ranks that did not answer, within this many seconds.

    Every rank must run every MoE forward, with zero tokens if it has none, or its peers wait for it.
    """
    layers = [(name, m) for name, m in module.named_modules() if isinstance(m, MoE)]
    if not layers:
        raise ValueError(f"module ({type(module).__name__}) contains no moe.MoE layer")
    if dispatcher not in ("all_to_all", "all_gather"):
        raise ValueError(f"dispatcher ({dispatcher!r}) must be 'all_to_all' or 'all_gather'")
    if dispatcher == "all_to_all" and max_tokens is not None:
        raise ValueError(f"max_tokens ({max_tokens}) only applies to dispatcher='all_gather'")
    for name, layer in layers:
        comm = EPComm(group, timeout_s)
        chosen = _placement_for(placement, name, layer.config.num_experts, comm.world_size)
        table = chosen.slot_table(layer.experts.w13_E2FD.device)
        layer.experts = local_experts(layer.experts, chosen.local_experts(comm.rank))
        if dispatcher == "all_to_all":
            layer.dispatcher = AllToAllDispatcher(table, comm)
        else:
            layer.dispatcher = AllGatherDispatcher(table, comm, max_tokens)
        layer.expert_placement = chosen
    return module


def local_experts(experts: nn.Module, logical_ids: Sequence[int]) -> nn.Module:
    """A new experts module of the same class holding copies of experts ``logical_ids`` (in that order).

    Every parameter and buffer whose leading dimension is the expert count is indexed; the others are kept.
    The class must accept ``(config, num_local_experts=L)`` (``moe.experts.Experts`` does); its freshly
    initialised ``L``-expert tensors are replaced by the copies (not the meta device: its first use costs ~3 s
    of lazy imports, more than initialising ``L`` experts).
    """
    E = experts.num_experts
    state = experts.state_dict()
    first = next(iter(state.values()))
    index_L = torch.tensor(list(logical_ids), dtype=torch.long, device=first.device)
    local_state = {k: v[index_L] if v.dim() and v.shape[0] == E else v for k, v in state.items()}
    local = type(experts)(experts.config, num_local_experts=len(logical_ids))
    local.load_state_dict(local_state, assign=True)
    return local.train(experts.training)


def _placement_for(placement: PlacementArg, name: str, num_experts: int, num_ranks: int) -> ExpertPlacement:
    if placement is None:
        chosen = ExpertPlacement.linear(num_experts, num_ranks)
    elif isinstance(placement, ExpertPlacement):
        chosen = placement
    elif name in placement:
        chosen = placement[name]
    else:
        raise ValueError(f"placement has no entry for MoE layer {name!r} (keys: {sorted(placement)[:5]})")
    if (chosen.num_experts, chosen.num_ranks) != (num_experts, num_ranks):
        raise ValueError(f"placement for {name!r} is for {chosen.num_experts} experts on {chosen.num_ranks} ranks; "
                         f"the layer has num_experts ({num_experts}) and the group {num_ranks} ranks")
    return chosen
