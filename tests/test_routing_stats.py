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
    for expert in [0, 1, 2]:
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


def test_patched_hf_model_counts_every_token_of_every_moe_layer():
    import moe
    from tests.hf_tiny import tiny_model

    model = tiny_model("qwen3_moe")  # 2 layers, E=8, K=3
    moe.patch_hf(model)
    stats = RoutingStats.attach(model, window=2, name="tiny")
    with torch.no_grad():
        model(torch.randint(0, model.config.vocab_size, (2, 11)))
    counts = stats.cumulative_counts()
    assert counts.shape == (2, 8) and counts.dtype == torch.int64
    assert counts.sum(dim=1).tolist() == [2 * 11 * 3] * 2
    assert stats.layer_names == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert stats.to_dict()["model"] == "tiny" and stats.top_k == 3


def test_counts_accumulate_under_inference_mode_for_batched_inputs():
    layer = MoE(MoEConfig(16, 8, 5, 3))
    stats = RoutingStats.attach(layer)
    x = torch.randn(2, 7, 16)  # [B, S, D]: the layer flattens to T=14
    with torch.inference_mode():
        layer(x)
        layer(x)
    ids = layer.router(x.reshape(-1, 16)).ids_TK
    assert torch.equal(stats.cumulative_counts()[0], 2 * torch.bincount(ids.reshape(-1).long(), minlength=5))
    assert stats.layer_names == ["0"]


def test_padding_mask_and_awkward_sizes():
    stats = RoutingStats(num_layers=2, num_experts=7)
    ids = torch.randint(0, 7, (222, 3), dtype=torch.int32)
    valid = torch.rand(222) < 0.6
    stats.record(1, ids, valid_T=valid)
    stats.record(0, ids[:1])  # one token
    expected = torch.bincount(ids[valid].reshape(-1).long(), minlength=7)
    assert torch.equal(stats.cumulative_counts()[1], expected)
    assert stats.cumulative_counts()[0].sum().item() == 3
    assert stats.window_counts().sum().item() == 0  # nothing closed yet: the open step is not in the window
    stats.step()
    assert torch.equal(stats.window_counts(), stats.cumulative_counts())


def test_window_ring_wraps_many_times():
    stats = RoutingStats(num_layers=1, num_experts=3, window=3)
    for step in range(10):  # step s routes (s + 1) tokens to expert s % 3
        stats.record(0, torch.full((step + 1, 1), step % 3))
        stats.step()
    assert stats.window_counts().tolist() == [[10, 8, 9]]  # steps 7, 8, 9 -> experts 1, 2, 0
    assert stats.cumulative_counts().sum().item() == 55
    d = stats.to_dict()
    assert (d["steps"], d["window"], d["window_steps"]) == (10, 3, 3)


def test_detach_and_reattach_replace_observers():
    model = _model(num_layers=2)
    first = RoutingStats.attach(model)
    second = RoutingStats.attach(model)  # replaces the first one's observers
    model(torch.randn(4, 16))
    assert first.cumulative_counts().sum().item() == 0 and second.cumulative_counts().sum().item() == 2 * 4 * 2
    first.detach()  # not its observers any more: nothing changes
    assert all(layer.on_routing is not None for layer in model)
    second.detach()
    assert all(layer.on_routing is None for layer in model)


def test_expert_bytes_of_a_swiglu_layer():
    stats = RoutingStats.attach(MoE(MoEConfig(16, 8, 6, 2)))
    assert stats.expert_bytes == 3 * 16 * 8 * 4  # w13 [2F, D] + w2 [D, F], fp32


def test_to_dict_is_json_and_from_dict_round_trips_every_field():
    model = _model(num_layers=2)
    stats = RoutingStats.attach(model, window=3, name="m")
    for _ in range(4):
        model(torch.randn(5, 16))
        stats.step()
    model(torch.randn(2, 16))  # an open step: in the cumulative counts only
    d = json.loads(json.dumps(stats.to_dict()))
    again = RoutingStats.from_dict(d).to_dict()
    assert again == d
    assert sum(d["cumulative"][0]) == 22 * 2 and sum(d["windowed"][0]) == 15 * 2


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("num_experts"), "missing key 'num_experts'"),
    (lambda d: d.update(windowed=[[9] * 6, [0] * 6]), "windowed counts exceed the cumulative counts"),
    (lambda d: d.update(layer_names=["a"]), "layer_names has 1 names for num_layers"),
    (lambda d: d.update(cumulative=[[-1] * 6, [0] * 6], windowed=[[0] * 6] * 2), "cumulative has negative counts"),
    (lambda d: d.update(num_experts=8), r"cumulative has shape \(2, 6\), expected \(2, 8\)"),
    (lambda d: d.update(cumulative="x"), "malformed"),
])
def test_mismatched_content_is_one_clear_line(change, message):
    model = _model(num_layers=2)
    stats = RoutingStats.attach(model)
    model(torch.randn(3, 16))
    stats.step()
    d = stats.to_dict()
    change(d)
    with pytest.raises(ValueError, match=message) as err:
        RoutingStats.from_dict(d)
    assert "\n" not in str(err.value)


@pytest.mark.gpu
def test_recording_on_cuda_never_syncs_the_host():
    stats = RoutingStats(num_layers=1, num_experts=8, device="cuda")
    ids = torch.randint(0, 8, (33, 2), device="cuda")
    valid = torch.rand(33, device="cuda") < 0.5
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats.record(0, ids)
        stats.record(0, ids, valid_T=valid)
        stats.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = torch.bincount(ids.reshape(-1), minlength=8) + torch.bincount(ids[valid].reshape(-1), minlength=8)
    assert torch.equal(stats.cumulative_counts()[0], expected)
