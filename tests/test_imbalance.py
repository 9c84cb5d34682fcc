"""Imbalance metrics on hand-computed cases (the worked example of expert_parallel/imbalance.py and a few more)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from expert_parallel.imbalance import (
    EpLoad,
    LayerLoad,
    balancedness,
    coefficient_of_variation,
    dead_experts,
    default_redundant,
    ep_loads,
    hottest_experts,
    max_over_mean,
    normalized_entropy,
    rank_loads,
    straggler,
)
from expert_parallel.placement import ExpertPlacement

EXAMPLE = [6, 2, 0, 0]  # the module docstring's worked example


@pytest.mark.parametrize("kind", [list, np.array, torch.tensor])
def test_worked_example_in_every_input_type(kind):
    c = kind(EXAMPLE)
    assert max_over_mean(c) == 3.0  # max 6 / mean 2
    assert coefficient_of_variation(c) == pytest.approx(math.sqrt((16 + 0 + 4 + 4) / 4) / 2)  # 1.2247
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))  # 0.5623 nats
    assert normalized_entropy(c) == pytest.approx(entropy / math.log(4))  # 0.4056
    assert hottest_experts(c) == [0, 1]  # experts with no load are never "hot"
    assert dead_experts(c) == [2, 3]


def test_extremes_even_single_and_empty():
    assert (max_over_mean([5] * 8), coefficient_of_variation([5] * 8), normalized_entropy([5] * 8)) == (1.0, 0.0, 1.0)
    one = [0, 0, 12, 0]
    assert max_over_mean(one) == 4.0  # = E when one expert takes everything
    assert coefficient_of_variation(one) == pytest.approx(math.sqrt(3))
    assert normalized_entropy(one) == 0.0
    assert dead_experts(one) == [0, 1, 3]
    empty = [0, 0, 0]
    assert (max_over_mean(empty), coefficient_of_variation(empty), normalized_entropy(empty)) == (1.0, 0.0, 1.0)
    assert hottest_experts(empty) == [] and dead_experts(empty) == [0, 1, 2]


def test_hottest_orders_by_load_then_id():
    assert hottest_experts([3, 9, 9, 1, 4], n=3) == [1, 2, 4]
    assert hottest_experts([3, 9, 9, 1, 4], n=10) == [1, 2, 4, 0, 3]


def test_rank_loads_balancedness_and_straggler():
    linear, rr = ExpertPlacement.linear(4, 2), ExpertPlacement.round_robin(4, 2)
    assert rank_loads(EXAMPLE, linear).tolist() == [8.0, 0.0]  # rank 0: experts 0, 1
    assert rank_loads(torch.tensor(EXAMPLE), rr).tolist() == [6.0, 2.0]  # rank 0: experts 0, 2
    assert balancedness([8, 0]) == 0.5 and balancedness([6, 2]) == pytest.approx(4 / 6)
    assert balancedness([0, 0]) == 1.0
    assert straggler([8, 0]) == 0 and straggler([2, 6, 6]) == 1  # ties: the lowest rank


def test_rank_loads_split_an_expert_over_its_replicas():
    placement = ExpertPlacement.balanced([8, 1, 1, 1], 2, num_redundant=2)  # expert 0 in three slots
    assert placement.replica_counts() == [3, 1, 1, 1]
    loads = rank_loads([8, 1, 1, 1], placement)
    assert loads.tolist() == pytest.approx([8 / 3 * 2 + 1, 8 / 3 + 2])  # 6.33 and 4.67
    assert balancedness(loads) == pytest.approx(5.5 / (19 / 3))


def test_layer_load_summary():
    row = LayerLoad.of("layers.0", torch.tensor(EXAMPLE), num_hottest=3)
    assert (row.routed, row.max_over_mean, row.hottest, row.hottest_share, row.dead) == (
        8, 3.0, [0, 1], [0.75, 0.25], [2, 3])


def test_step_balancedness_weights_each_layers_straggler():
    # Layer 0 overloads rank 0, layer 1 rank 1: the summed loads look perfect, each layer still waits 3 vs 2.
    load = EpLoad.of([[3, 1], [1, 3]], ep_size=2, kind="linear")
    assert load.loads == [4.0, 4.0] and load.balancedness == 1.0
    assert load.layer_balancedness == [pytest.approx(2 / 3)] * 2 and load.layer_stragglers == [0, 1]
    assert load.step_balancedness == pytest.approx((2 + 2) / (3 + 3))


def test_eplb_advice_hand_case():
    # [3, 1] with 2 replica slots: expert 0 gets 3 replicas of load 1 -> 4 slots of load 1 -> ranks [2, 2].
    loads, advice = ep_loads([[3, 1], [1, 3]], ep_size=2, num_redundant=2, expert_bytes=1000)
    assert [row.placement for row in loads] == ["linear", "round_robin", "eplb"]
    assert advice.eplb.loads == [4.0, 4.0] and advice.eplb.step_balancedness == 1.0
    assert advice.baseline.placement == "linear"
    assert advice.predicted_speedup == pytest.approx(1.5)  # linear: each layer's straggler has 3, EPLB 2
    assert (advice.replica_bytes, advice.replica_bytes_per_rank) == (1000 * 2 * 2, 1000 * 2 * 2 // 2)
    d = advice.to_dict()
    assert d["phy2log"] == [[0, 0, 0, 1], [0, 1, 1, 1]] and d["predicted_speedup"] == pytest.approx(1.5)


def test_placements_that_fit_and_one_that_does_not():
    assert [default_redundant(8, 4), default_redundant(6, 4), default_redundant(8, 3)] == [4, 2, 1]
    counts = [[5, 1, 1, 1, 1, 1]]  # E=6
    loads, advice = ep_loads(counts, ep_size=4)  # 6 % 4 != 0: only EPLB (2 redundant slots) fits
    assert [row.placement for row in loads] == ["eplb"] and advice.num_redundant == 2
    assert advice.baseline is None and advice.predicted_speedup is None and advice.replica_bytes is None
    with pytest.raises(ValueError, match=r"num_experts \+ num_redundant \(9\) must be divisible by num_ranks \(4\)"):
        ep_loads(counts, ep_size=4, num_redundant=3)
