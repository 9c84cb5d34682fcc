"""Routing math: families' routers, ties, saturated and underflowing sigmoid scores, grouped top-k."""

import pytest
import torch

from routing import GroupScore, RouterConfig, Scoring, route


def test_softmax_topk_renormalised_matches_definition():
    logits = torch.randn(33, 8)
    w, ids = route(logits, RouterConfig(8, 3))
    probs = logits.softmax(-1)
    expected_ids = probs.topk(3).indices
    assert torch.equal(ids, expected_ids)
    expected = probs.gather(1, ids)
    torch.testing.assert_close(w, expected / expected.sum(-1, keepdim=True))
    assert w.dtype == torch.float32


def test_softmax_without_renormalisation_keeps_probabilities():
    logits = torch.randn(5, 6)
    w, ids = route(logits, RouterConfig(6, 2, renormalize=False))
    torch.testing.assert_close(w, logits.softmax(-1).gather(1, ids))


def test_ties_give_equal_nonzero_weights():
    logits = torch.zeros(4, 8)  # every expert tied
    for scoring in (Scoring.SOFTMAX, Scoring.SIGMOID, Scoring.SOFTMAX_TOPK):
        w, ids = route(logits, RouterConfig(8, 2, scoring=scoring))
        torch.testing.assert_close(w, torch.full((4, 2), 0.5))
        assert (ids[:, 0] != ids[:, 1]).all()


def test_saturated_sigmoid_selects_by_logit_and_keeps_weights():
    # sigmoid(30) == sigmoid(60) == 1.0 in fp32: selection must still follow the logits.
    logits = torch.tensor([[30.0, 60.0, -5.0, 45.0]])
    w, ids = route(logits, RouterConfig(4, 2, scoring=Scoring.SIGMOID))
    assert sorted(ids[0].tolist()) == [1, 3]
    torch.testing.assert_close(w, torch.full((1, 2), 0.5))


def test_underflowing_sigmoid_scores_keep_their_proportions():
    # sigmoid(-200) underflows to 0 in fp32; s_i / sum s_j must still be exp(l_i) / sum exp(l_j) in the limit.
    logits = torch.tensor([[-200.0, -201.0, -300.0, -250.0]])
    w, ids = route(logits, RouterConfig(4, 2, scoring=Scoring.SIGMOID))
    assert ids[0].tolist() == [0, 1]
    l64 = logits.double()[0, :2]
    expected = torch.softmax(torch.nn.functional.logsigmoid(l64), 0).float()
    torch.testing.assert_close(w[0], expected)
    assert torch.isfinite(w).all() and (w > 0).all()


def test_correction_bias_selects_but_never_weights():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 10.0])
    cfg = RouterConfig(4, 2, scoring=Scoring.SIGMOID, correction_bias=True, renormalize=False)
    w, ids = route(logits, cfg, bias)
    assert sorted(ids[0].tolist()) == [0, 3]
    torch.testing.assert_close(w[0].sort().values, torch.sigmoid(logits[0, [3, 0]]).sort().values)


def test_grouped_topk_masks_other_groups():
    # Group 0 = experts 0-3, group 1 = 4-7. Expert 0 is the single best, but group 1's top-2 sum is larger.
    logits = torch.tensor([[5.0, -5.0, -5.0, -5.0, 3.0, 3.0, -5.0, -5.0]])
    cfg = RouterConfig(8, 2, scoring=Scoring.SIGMOID, num_groups=2, topk_groups=1, correction_bias=True,
                       group_score=GroupScore.TOP2_SUM, routed_scaling_factor=2.5)
    w, ids = route(logits, cfg, torch.zeros(8))
    assert sorted(ids[0].tolist()) == [4, 5]
    torch.testing.assert_close(w, torch.full((1, 2), 1.25))
    cfg_max = RouterConfig(8, 2, scoring=Scoring.SOFTMAX, num_groups=2, topk_groups=1, group_score=GroupScore.MAX)
    _, ids_max = route(logits, cfg_max)
    assert 0 in ids_max[0].tolist()
    assert all(i < 4 for i in ids_max[0].tolist())


def test_softmax_after_topk_equals_gpt_oss_definition():
    logits = torch.randn(7, 8)
    w, ids = route(logits, RouterConfig(8, 2, scoring=Scoring.SOFTMAX_TOPK))
    top, top_ids = logits.topk(2)
    assert torch.equal(ids, top_ids)
    torch.testing.assert_close(w, top.softmax(-1))


@pytest.mark.parametrize("renormalize", [True, False])
def test_sqrt_softplus_scores_match_deepseek_v4_definition(renormalize):
    logits = 3 * torch.randn(17, 8)
    bias = torch.randn(8)
    cfg = RouterConfig(8, 3, scoring=Scoring.SQRT_SOFTPLUS, correction_bias=True, renormalize=renormalize,
                       routed_scaling_factor=1.5)
    w, ids = route(logits, cfg, bias)
    scores = torch.nn.functional.softplus(logits).sqrt()
    assert torch.equal(ids.sort().values, (scores + bias).topk(3).indices.sort().values)
    chosen = scores.gather(1, ids)
    expected = chosen / chosen.sum(-1, keepdim=True) if renormalize else chosen
    torch.testing.assert_close(w, 1.5 * expected)


def test_bias_on_logits_selects_on_shifted_logits_and_weights_by_the_scores():
    # Kolibri-1 picks by logit + bias: 0.5 + 0.9 > 0.2 + 1.0; by sigmoid + bias it would be expert 0 instead
    # (sigmoid(0.2) + 1.0 = 1.55 > sigmoid(0.5) + 0.9 = 1.52). The weight is the chosen expert's sigmoid.
    logits = torch.tensor([[0.2, -2.0, 0.5, -3.0]])
    bias = torch.tensor([1.0, 0.0, 0.9, 0.0])
    on_logits = RouterConfig(4, 1, scoring=Scoring.SIGMOID, correction_bias=True, bias_on_logits=True,
                             renormalize=False)
    w, ids = route(logits, on_logits, bias)
    assert ids.tolist() == [[2]]
    torch.testing.assert_close(w, torch.sigmoid(logits[:, 2:3]))
    on_scores = RouterConfig(4, 1, scoring=Scoring.SIGMOID, correction_bias=True, renormalize=False)
    assert route(logits, on_scores, bias)[1].tolist() == [[0]]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(num_experts=4, top_k=5), "top_k"),
        (dict(num_experts=6, top_k=2, num_groups=4), "num_groups"),
        (dict(num_experts=8, top_k=2, num_groups=2, topk_groups=3), "topk_groups"),
        (dict(num_experts=8, top_k=5, num_groups=4, topk_groups=2), "top_k"),
        (dict(num_experts=8, top_k=2, scoring="cosine"), "scoring.*cosine"),
        (dict(num_experts=8, top_k=2, routed_scaling_factor=0.0), "routed_scaling_factor"),
        (dict(num_experts=8, top_k=2, bias_on_logits=True), "bias_on_logits"),
    ],
)
def test_bad_router_config_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        RouterConfig(**kwargs)
