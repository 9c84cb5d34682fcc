"""Load-balanced placement with redundant experts, following DeepSeek's EPLB (github.com/deepseek-ai/EPLB).

Hierarchical policy (when the expert groups divide evenly over the nodes, else one global pass):

1. pack expert groups onto nodes so that node loads are balanced (keeps grouped top-k traffic in a node);
2. within each node, give the redundant slots one at a time to the expert with the largest load per replica;
3. pack the node's replicas (each carrying load / replicas) onto its GPUs, the same number per GPU.

Host-side planning on a per-expert load vector (e.g. tokens per expert over the last N steps); not on the
hot path. Shape legend: E logical experts, P physical slots, W ranks (GPUs), S = P / W slots per rank.
"""

from __future__ import annotations

from collections.abc import Sequence


def balanced_packing(weights: Sequence[float], num_packs: int) -> list[int]:
    """Pack index of each item: heaviest first into the lightest pack that is not full (len/num_packs each).

    Example: ``balanced_packing([4, 3, 2, 1], 2) -> [0, 1, 1, 0]`` (packs weigh 5 and 5).
    """
    if num_packs < 1 or len(weights) % num_packs:
        raise ValueError(f"number of items ({len(weights)}) must be a multiple of num_packs ({num_packs})")
    per_pack = len(weights) // num_packs
    pack_load, pack_items = [0.0] * num_packs, [0] * num_packs
    pack_of = [-1] * len(weights)
    for item in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        pack = min((p for p in range(num_packs) if pack_items[p] < per_pack), key=lambda p: (pack_load[p], p))
        pack_of[item] = pack
        pack_load[pack] += weights[item]
        pack_items[pack] += 1
    return pack_of


def replicate(load: Sequence[float], num_slots: int) -> list[int]:
    """Replicas per expert: ``num_slots - len(load)`` extra ones, each to the largest load per replica.

    Example: ``replicate([6, 2, 1], 5) -> [3, 1, 1]`` (6/1 -> 6/2 -> 6/3 = 2 ties expert 1; first wins).
    """
    if num_slots < len(load):
        raise ValueError(f"num_slots ({num_slots}) must be >= the number of experts ({len(load)})")
    counts = [1] * len(load)
    for _ in range(num_slots - len(load)):
        hottest = max(range(len(load)), key=lambda e: (load[e] / counts[e], -e))
        counts[hottest] += 1
    return counts


def rebalance(load_E: Sequence[float], num_ranks: int, num_redundant: int = 0, num_groups: int = 1,
              num_nodes: int = 1) -> list[int]:
    """``phy2log``: the logical expert of each of the ``E + num_redundant`` slots, rank-major (``S`` per rank)."""
    E, P = len(load_E), len(load_E) + num_redundant
    if num_redundant < 0:
        raise ValueError(f"num_redundant ({num_redundant}) must be >= 0")
    if num_ranks < 1 or P % num_ranks:
        raise ValueError(f"num_experts + num_redundant ({P}) must be divisible by num_ranks ({num_ranks})")
    if num_nodes < 1 or num_ranks % num_nodes:
        raise ValueError(f"num_ranks ({num_ranks}) must be divisible by num_nodes ({num_nodes})")
    if num_groups < 1 or E % num_groups:
        raise ValueError(f"num_groups ({num_groups}) must divide num_experts ({E})")
    if num_groups % num_nodes:  # EPLB's fallback: one global pass, as if a single node held one group
        num_groups = num_nodes = 1
    load = [float(v) for v in load_E]
    group_size = E // num_groups
    # 1. groups -> nodes
    group_load = [sum(load[g * group_size:(g + 1) * group_size]) for g in range(num_groups)]
    node_of_group = balanced_packing(group_load, num_nodes)
    phy2log: list[int] = []
    for node in range(num_nodes):
        experts = [e for e in range(E) if node_of_group[e // group_size] == node]
        phy2log += _place_in_node([load[e] for e in experts], experts, P // num_nodes, num_ranks // num_nodes)
    return phy2log


def _place_in_node(load: list[float], experts: list[int], num_slots: int, num_ranks: int) -> list[int]:
    """Steps 2 and 3 within one node: replicas to the hottest experts, then replicas to ranks."""
    counts = replicate(load, num_slots)
    replica_expert = [i for i, c in enumerate(counts) for _ in range(c)]
    rank_of_replica = balanced_packing([load[i] / counts[i] for i in replica_expert], num_ranks)
    slots: list[int] = []
    for rank in range(num_ranks):
        slots += sorted(experts[i] for i, r in zip(replica_expert, rank_of_replica, strict=True) if r == rank)
    return slots
