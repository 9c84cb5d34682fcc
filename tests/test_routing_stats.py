"""RoutingStats: device-side counts equal a bincount of the routing, windows drop old steps, files round-trip."""

from __future__ import annotations

import json

import pytest
import torch

from moe import MoE, MoEConfig
from routing.stats import RoutingStats


def _model(num_layers=3, num_experts=6, top_k=2):
    return torch.nn.Sequential(*[MoE(MoEConfig(16, 8, num_experts, top_k)) for _ in range(num_layers)])


def test_counts_equal_a_bincount_of_each_layers_routing():
    model = _model()
    stats = RoutingStats.attach(model, window=4)
    x = torch.randn(33, 16)
    expected = []
    h = x
    for layer in model:
        y, routing = layer.forward_with_routing(h)
        expected.append(torch.bincount(routing.ids_TK.reshape(-1).long(), minlength=6))
        h = y
    assert torch.equal(stats.cumulative_counts(), torch.stack(expected))
    assert int(stats.cumulative_counts().sum()) == 3 * 33 * 2
    stats.detach()
    model(x)
    assert torch.equal(stats.cumulative_counts(), torch.stack(expected))  # detached: nothing more counted


def test_window_keeps_only_the_last_steps_and_padding_is_excluded():
    stats = RoutingStats(num_layers=1, num_experts=4, window=2)
    for step, expert in enumerate([0, 1, 2]):
        stats.record(0, torch.full((5, 1), expert), valid_T=torch.arange(5) < 3)  # 2 padding tokens
        stats.step()
    assert stats.cumulative_counts().tolist() == [[3, 3, 3, 0]]
    assert stats.window_counts().tolist() == [[0, 3, 3, 0]]  # step 0 fell out of the window
    assert stats.steps == 3


def test_file_round_trip_and_clear_errors(tmp_path):
    model = _model(num_layers=2)
    stats = RoutingStats.attach(model)
    model(torch.randn(10, 16))
    stats.step()
    path = tmp_path / "stats.json"
    stats.save(path)
    loaded = RoutingStats.load(path)
    assert loaded.to_dict()["cumulative"] == stats.to_dict()["cumulative"]
    assert loaded.layer_names == ["0", "1"] and loaded.num_experts == 6
    bad = json.loads(path.read_text())
    bad["cumulative"] = bad["cumulative"][:1]
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"cumulative has shape \(1, 6\)"):
        RoutingStats.load(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read routing statistics"):
        RoutingStats.load(path)
    with pytest.raises(ValueError, match="not a routing statistics file"):
        RoutingStats.from_dict({"format": "other"})
    with pytest.raises(ValueError, match="no moe.MoE layers"):
        RoutingStats.attach(torch.nn.Linear(2, 2))
