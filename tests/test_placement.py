"""``ExpertPlacement`` and the EPLB planner: structure, validation, and balance on a Zipf load."""

import pytest
import torch

from all_to_all.slots import assign_slots
from expert_parallel import ExpertPlacement
from expert_parallel.eplb import balanced_packing, rebalance, replicate


def zipf_load(num_experts: int, s: float, seed: int = 0) -> list[float]:
    """Expected tokens per expert under Zipf(s), the hottest experts at random positions."""
    perm = torch.randperm(num_experts, generator=torch.Generator().manual_seed(seed)).tolist()
    return [(perm[e] + 1) ** -s for e in range(num_experts)]


def test_docstring_examples():
    assert balanced_packing([4, 3, 2, 1], 2) == [0, 1, 1, 0]
    assert replicate([6, 2, 1], 5) == [3, 1, 1]
    assert ExpertPlacement.linear(4, 2).phy2log == (0, 1, 2, 3)
    assert ExpertPlacement.round_robin(4, 2).phy2log == (0, 2, 1, 3)
    balanced = ExpertPlacement.balanced([8, 1, 1, 1], 2, num_redundant=2)
    assert balanced.phy2log == (0, 0, 3, 0, 1, 2)
    assert balanced.rank_loads([8, 1, 1, 1]) == pytest.approx([19 / 3, 14 / 3])
    assert ExpertPlacement.linear(4, 2).rank_loads([8, 1, 1, 1]) == [9, 2]


def test_local_experts_and_replicas():
    p = ExpertPlacement.round_robin(8, 4)
    assert [p.local_experts(r) for r in range(4)] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    balanced = ExpertPlacement.balanced(zipf_load(16, 1.2), 4, num_redundant=4)
    assert balanced.slots_per_rank == 5 and balanced.num_redundant == 4
    assert sum(balanced.replica_counts()) == 20 and min(balanced.replica_counts()) == 1


@pytest.mark.parametrize("build, match", [
    (lambda: ExpertPlacement.linear(63, 8), r"num_experts \(63\) must be divisible by num_ranks \(8\)"),
    (lambda: ExpertPlacement.balanced([1.0] * 64, 8, num_redundant=3), r"\(67\) must be divisible by num_ranks"),
    (lambda: ExpertPlacement.balanced([1.0] * 64, 8, num_nodes=3), r"num_ranks \(8\) must be divisible by num_nodes"),
    (lambda: ExpertPlacement((0, 0), 2, 1), r"experts \[1\] have no slot"),
    (lambda: ExpertPlacement.linear(8, 2).local_experts(2), r"rank \(2\)"),
])
def test_invalid_placements_name_the_field(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_eplb_balances_zipf_load_on_8_ranks():
    load = zipf_load(64, 1.2)
    linear = ExpertPlacement.linear(64, 8).max_over_mean(load)
    eplb = ExpertPlacement.balanced(load, 8, num_redundant=8)
    balanced = eplb.max_over_mean(load)
    print(f"Zipf s=1.2, E=64, 8 ranks: max/mean rank load linear {linear:.3f} -> EPLB (+8 slots) {balanced:.4f}")
    assert linear > 1.5 and balanced <= 1.10
    hottest = max(range(64), key=load.__getitem__)
    assert eplb.replica_counts()[hottest] == max(eplb.replica_counts()) > 1


def test_replica_split_realises_the_planned_balance():
    """Plan from measured counts, then route fresh Zipf tokens from 8 source ranks with ``assign_slots``."""
    g = torch.Generator().manual_seed(1)
    probs_E = torch.tensor(zipf_load(64, 1.2))
    sample = lambda: torch.multinomial(probs_E.expand(512, 64), 6, replacement=False, generator=g)  # noqa: E731
    measured_E = sum(torch.bincount(sample().view(-1), minlength=64) for _ in range(8))
    placement = ExpertPlacement.balanced(measured_E, 8, num_redundant=8)
    table = placement.slot_table()
    received_W = torch.zeros(8)
    for source in range(8):
        slot_N = assign_slots(sample(), table, source).view(-1)
        received_W += torch.bincount(slot_N // placement.slots_per_rank, minlength=8).float()
    realised = (received_W.max() / received_W.mean()).item()
    linear = ExpertPlacement.linear(64, 8).max_over_mean(measured_E)
    print(f"top-6 Zipf tokens: max/mean received rows linear {linear:.3f} -> EPLB + replica split {realised:.4f}")
    assert realised <= 1.10


def test_hierarchical_keeps_groups_on_one_node():
    load = zipf_load(32, 1.2, seed=3)
    phy2log = rebalance(load, num_ranks=8, num_redundant=8, num_groups=8, num_nodes=2)
    placement = ExpertPlacement(tuple(phy2log), 32, 8)
    node_slots = len(phy2log) // 2
    for node in range(2):
        experts = set(phy2log[node * node_slots:(node + 1) * node_slots])
        groups = {e // 4 for e in experts}
        assert all(set(range(g * 4, g * 4 + 4)) <= experts for g in groups)  # whole groups per node
        assert all(e // 4 not in groups for e in set(range(32)) - experts)
    assert placement.max_over_mean(load) < ExpertPlacement.linear(32, 8).max_over_mean(load)
