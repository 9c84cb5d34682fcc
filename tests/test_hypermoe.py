"""HyperMoE against ``hypermoe/reference.py`` (the paper's equations per token), its caches, training,
checkpoints, cross-layer sharing and config validation."""

import dataclasses
import itertools
import math

import pytest
import torch
from torch import nn

from hypermoe import HyperMoEConfig, HyperMoELayer, share_hypernetwork
from hypermoe.layer import all_sets_colex
from hypermoe.reference import reference_hypermoe, reference_unselected_sum
from moe import MoE, MoEConfig
from moe.reference import reference_moe_layer

D, F = 40, 24
SMALL = dict(expert_embedding_dim=24, process_dim=20, hypernet_input_dim=12, layer_embedding_dim=5,
             bottleneck_dim=16, adapter_dim=8)


def _layer(E=8, K=2, **hyper) -> MoE:
    """A MoE layer with HyperMoE, all weights random; the adapter's output is ~20% of the routed output's."""
    layer = MoE(MoEConfig(D, F, E, K, hypermoe=HyperMoEConfig(**{**SMALL, **hyper})))
    _randomise(layer)
    return layer


def _randomise(module: nn.Module) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.normal_(0.0, 0.05 if "hypernetwork.weight_" in name else 0.3)


def _distinct_ids(T: int, E: int, K: int) -> torch.Tensor:
    return torch.stack([torch.randperm(E)[:K] for _ in range(T)]).to(torch.int32)


def _full_reference(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """Routed experts (moe/reference.py) + the HyperExpert generated per token (hypermoe/reference.py)."""
    x_TD = x.reshape(-1, D)
    ids_TK = layer.router(x_TD).ids_TK
    adapter_TD = reference_hypermoe(layer.hypermoe, x_TD, ids_TK)
    return (reference_moe_layer(layer, x).double() + adapter_TD.reshape(x.shape)).to(x.dtype)


def _assert_close(got: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    assert got.shape == expected.shape and got.dtype == expected.dtype
    err = ((got.double() - expected.double()).norm() / expected.double().norm()).item()
    assert err <= rtol, err


@pytest.mark.parametrize("T", [1, 33, 222])
@pytest.mark.parametrize("E, K", [(4, 1), (8, 2), (6, 3)])
@pytest.mark.parametrize("cache_max_selections", [0, 64])
def test_layer_matches_per_token_reference(T, E, K, cache_max_selections):
    layer = _layer(E, K, cache_max_selections=cache_max_selections)
    x = torch.randn(T, D)
    with torch.no_grad():
        got = layer(x)
        _assert_close(got, _full_reference(layer, x))
        adapter_TD = reference_hypermoe(layer.hypermoe, x, layer.router(x).ids_TK)
        _assert_close((got - reference_moe_layer(layer, x)).double(), adapter_TD, rtol=1e-4)
    assert (layer.hypermoe._table is not None) == (cache_max_selections >= math.comb(E, K))
    # with autograd on, the adapters are generated per batch (never the table) and must agree too
    with torch.no_grad():
        expected = _full_reference(layer, x)
    _assert_close(layer(x).detach(), expected)


def test_paper_sizes_and_init_match_reference():
    """Default (paper) sizes and the paper's init, through a 3-D input: the adapter is small but exact."""
    layer = MoE(MoEConfig(D, F, 8, 2, hypermoe=HyperMoEConfig()))
    x = torch.randn(2, 17, D)
    with torch.no_grad():
        got = layer(x)
        ids_TK = layer.router(x.reshape(-1, D)).ids_TK
        adapter_TD = reference_hypermoe(layer.hypermoe, x.reshape(-1, D), ids_TK)
        _assert_close(got, _full_reference(layer, x))
        _assert_close((got - reference_moe_layer(layer, x)).reshape(-1, D).double(), adapter_TD, rtol=1e-3)
    assert 0 < adapter_TD.abs().max() < 1e-2  # hyper-fan-in: the generated adapter starts near zero


def test_hyperfanin_init():
    cfg = HyperMoEConfig()
    hn = HyperMoELayer(cfg, 8, 2, 96).hypernetwork
    B, A = cfg.bottleneck_dim, cfg.adapter_dim
    for head, bound in [(hn.weight_down, 1e-3 * math.sqrt(3 / (B * 96))), (hn.weight_up, 1e-3 * math.sqrt(3 / (B * A))),
                        (hn.bias_down, 1e-3 * math.sqrt(3 / B)), (hn.bias_up, 1e-3 * math.sqrt(3 / B))]:
        w = head.weight.detach()
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
        assert torch.equal(head.bias.detach(), torch.zeros_like(head.bias))


@pytest.mark.parametrize("E, K", [(8, 2), (7, 3), (5, 5), (4, 1)])
@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_sum_all_minus_selected_is_the_unselected_sum(E, K, dtype, atol):
    layer = HyperMoELayer(HyperMoEConfig(**SMALL), E, K, D).to(dtype)
    _randomise(layer)
    ids_TK = _distinct_ids(33, E, K)
    with torch.no_grad():
        fast_TX = layer.selection_embedding(ids_TK.long())  # rows unsorted: order within a set must not matter
        sorted_TX = layer.selection_embedding(ids_TK.long().sort(dim=1).values)
    expected_TX = reference_unselected_sum(layer.expert_embedding.weight.detach(), ids_TK)
    torch.testing.assert_close(fast_TX, expected_TX, rtol=0, atol=atol)
    torch.testing.assert_close(sorted_TX, expected_TX, rtol=0, atol=atol)
    if K == E:
        assert fast_TX.abs().max() <= atol  # no unselected expert: an empty sum


def test_cache_gives_identical_outputs_across_steps():
    layer = _layer(8, 2).hypermoe.eval()
    x_a, x_b = torch.randn(33, D), torch.randn(7, D)
    ids_a, ids_b = _distinct_ids(33, 8, 2), _distinct_ids(7, 8, 2)
    uncached = HyperMoELayer(dataclasses.replace(layer.config, cache_max_selections=0), 8, 2, D)
    uncached.load_state_dict(layer.state_dict())
    with torch.inference_mode():
        first = layer(x_a, ids_a)
        table = layer._table
        layer(x_b, ids_b)  # another step, other selections
        again = layer(x_a, ids_a)
        assert layer._table is table  # served from the cross-step cache, not regenerated
        assert torch.equal(again, first)
        torch.testing.assert_close(first, uncached(x_a, ids_a), rtol=1e-5, atol=1e-6)
        # one token alone gets the same adapter as in its batch
        torch.testing.assert_close(layer(x_a[5:6], ids_a[5:6]), first[5:6], rtol=1e-5, atol=1e-6)


def test_cache_is_rebuilt_when_a_parameter_changes():
    layer = _layer(8, 2).hypermoe
    x, ids = torch.randn(9, D), _distinct_ids(9, 8, 2)
    with torch.no_grad():
        before = layer(x, ids)
        layer.hypernetwork.bias_up.bias.add_(1.0)  # in place, as an optimizer step or load_state_dict would
        after = layer(x, ids)
    torch.testing.assert_close(after, before + 1.0, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(after, reference_hypermoe(layer, x, ids).float(), rtol=1e-5, atol=1e-5)


def test_training_step_changes_every_hypermoe_parameter():
    model = nn.Sequential(_layer(8, 2), _layer(8, 2))
    assert share_hypernetwork(model) == 2
    hyper_params = {n: p.detach().clone() for n, p in model.named_parameters() if "hypermoe" in n}
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    x = torch.randn(64, D)
    for _ in range(2):  # the second step runs after the first changed the weights (no stale cache in training)
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
    for name, p in model.named_parameters():
        if name in hyper_params:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert not torch.equal(p.detach(), hyper_params[name]), name
    assert model[0].hypermoe._table is None  # autograd never used the detached cross-step table


def test_state_dict_round_trip():
    def build():
        model = nn.Sequential(*(_layer(8, 2) for _ in range(3)))
        share_hypernetwork(model)
        return model

    model, copy = build(), build()
    state = model.state_dict()
    assert "0.hypermoe.expert_embedding.weight" in state and "2.hypermoe.hypernetwork.weight_up.weight" in state
    assert not any("_table" in k for k in state)
    copy.load_state_dict(state)
    x = torch.randn(2, 11, D)
    with torch.no_grad():
        assert torch.equal(copy(x), model(x))
    assert all(layer.hypermoe.hypernetwork is copy[0].hypermoe.hypernetwork for layer in copy)


def test_share_hypernetwork_numbers_layers_and_grows_the_layer_table():
    model = nn.Sequential(_layer(8, 2), nn.ReLU(), _layer(8, 2), _layer(8, 2))
    assert share_hypernetwork(model) == 3
    layers = [model[0], model[2], model[3]]
    shared = layers[0].hypermoe.hypernetwork
    assert shared.layer_embedding.num_embeddings == 3
    assert [m.hypermoe.layer_index for m in layers] == [0, 1, 2]
    assert all(m.hypermoe.hypernetwork is shared for m in layers)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for m in layers for p in m.parameters()) - (
        2 * sum(p.numel() for p in shared.parameters()))  # counted once
    # same expert embeddings and selection, different layer index -> different adapters
    with torch.no_grad():
        layers[1].hypermoe.expert_embedding.weight.copy_(layers[0].hypermoe.expert_embedding.weight)
        layers[1].hypermoe.process.load_state_dict(layers[0].hypermoe.process.state_dict())
    _randomise(shared)
    with torch.no_grad():
        x, ids = torch.randn(5, D), _distinct_ids(5, 8, 2)
        assert not torch.allclose(layers[0].hypermoe(x, ids), layers[1].hypermoe(x, ids))
        _assert_close(layers[1].hypermoe(x, ids).double(), reference_hypermoe(layers[1].hypermoe, x, ids))
    assert share_hypernetwork(nn.Sequential(MoE(MoEConfig(D, F, 4, 2)))) == 0


def test_share_hypernetwork_rejects_mismatched_layers():
    model = nn.Sequential(_layer(8, 2), _layer(8, 2, adapter_dim=4))
    with pytest.raises(ValueError, match="cannot share"):
        share_hypernetwork(model)


def test_hypernetwork_passed_at_construction():
    first = _layer(8, 2)
    second = MoE(first.config, hypernetwork=first.hypermoe.hypernetwork)
    assert second.hypermoe.hypernetwork is first.hypermoe.hypernetwork
    with pytest.raises(ValueError, match="config.hypermoe is None"):
        MoE(MoEConfig(D, F, 8, 2), hypernetwork=first.hypermoe.hypernetwork)


def test_off_by_default():
    layer = MoE(MoEConfig(D, F, 8, 2))
    assert layer.hypermoe is None and not any("hyper" in k for k in layer.state_dict())


def test_bf16_layer():
    layer = _layer(8, 2)
    x = 0.1 * torch.randn(33, D)
    with torch.no_grad():
        expected = _full_reference(layer, x)
        got = layer.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=0, atol=2e-2 * expected.abs().max().item())


@pytest.mark.parametrize("field, value", [
    ("adapter_dim", 0), ("bottleneck_dim", -3), ("num_layers", 0), ("layer_embedding_dim", 2.5),
    ("expert_embedding_dim", True), ("cache_max_selections", -1),
])
def test_config_validation(field, value):
    with pytest.raises(ValueError, match=rf"{field} \({value!r}\)"):
        HyperMoEConfig(**{field: value})


def test_moe_config_hypermoe_field():
    cfg = MoEConfig(D, F, 8, 2, hypermoe={"adapter_dim": 16})  # as a dict, e.g. from a YAML file
    assert cfg.hypermoe == HyperMoEConfig(adapter_dim=16)
    with pytest.raises(ValueError, match="hypermoe \\('yes'\\)"):
        MoEConfig(D, F, 8, 2, hypermoe="yes")
    with pytest.raises(ValueError, match="adapter_dim"):
        MoEConfig(D, F, 8, 2, hypermoe={"adapter_dim": 0})


def test_table_rows_are_colex_ranks_of_every_selected_set():
    layer = _layer(6, 3).hypermoe
    sets_CK = all_sets_colex(6, 3)
    assert sets_CK.shape == (math.comb(6, 3), 3)
    assert sorted(map(tuple, sets_CK.tolist())) == list(itertools.combinations(range(6), 3))
    shuffled = torch.randperm(sets_CK.shape[0])
    uniq_UK, rank_U, inverse_T, counts_U = layer.group_sets(sets_CK[shuffled].flip(1))  # unsorted rows
    assert torch.equal(rank_U, torch.arange(sets_CK.shape[0])) and torch.equal(uniq_UK, sets_CK)
    assert torch.equal(inverse_T, shuffled) and torch.equal(counts_U, torch.ones_like(counts_U))
    with torch.no_grad():
        layer(torch.randn(1, D), torch.tensor([[0, 1, 2]]))
        expected = layer.generate(sets_CK[[7, 19]])
    for got, want in zip(layer._table, expected, strict=True):
        torch.testing.assert_close(got[[7, 19]], want)


def test_grouping_without_colex_ranks_matches():
    """When C(E, K) overflows int64 the sets are grouped by torch.unique over rows: same groups."""
    layer = _layer(8, 2, cache_max_selections=0).hypermoe
    x, ids = torch.randn(40, D), _distinct_ids(40, 8, 2)
    with torch.no_grad():
        with_ranks = layer(x, ids)
        layer.colex_EK = None
        _assert_close(layer(x, ids), with_ranks)
