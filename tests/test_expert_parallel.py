"""``shard_moe``: the expert-parallel layer equals the single-process layer on 2 and 4 gloo ranks.

One spawn per world size runs the whole matrix (placements x dispatchers x routings) and reports a relative
error per case; the parametrised tests below read it. Routing is forced with ``FixedRouter`` so that the
degenerate cases are exactly what their names say.
"""

from __future__ import annotations

import traceback

import pytest
import torch
from torch import nn

from expert_parallel import ExpertPlacement, shard_moe
from moe import MoE, MoEConfig
from routing.router import Routing
from tests.dist_harness import run_ranks

D, F_, E, SHARED_F = 24, 20, 8, 16
ZIPF_E = [(e + 1) ** -1.2 for e in range(E)]
DISPATCHERS = {
    "all_to_all": dict(dispatcher="all_to_all"),
    "all_gather": dict(dispatcher="all_gather"),
    "all_gather_static": dict(dispatcher="all_gather", max_tokens=40),
}
PLACEMENTS = ("linear", "round_robin", "eplb_redundant")
ROUTINGS = ("router", "balanced", "zipf", "one_expert", "t1", "rank_sends_nothing", "apply_on_input")
EXCLUSIVE_ROUTINGS = ("rank_receives_nothing", "all_local")  # need experts that live on one rank only
CASES = [f"{p}/{d}/{r}" for p in PLACEMENTS for d in DISPATCHERS
         for r in ROUTINGS + (EXCLUSIVE_ROUTINGS if p != "eplb_redundant" else ())]
MODEL_CASE = "model_with_two_moe_layers"


class FixedRouter(nn.Module):
    """Returns a given routing whatever the input (the single-process and EP layers see the same one)."""

    def __init__(self, ids_TK: torch.Tensor, weights_TK: torch.Tensor, apply_on_input: bool = False) -> None:
        super().__init__()
        self.ids_TK, self.weights_TK, self.apply_on_input = ids_TK.to(torch.int32), weights_TK.float(), apply_on_input

    def forward(self, x_TD: torch.Tensor) -> Routing:
        assert x_TD.shape[0] == self.ids_TK.shape[0]
        return Routing(self.weights_TK, self.ids_TK, torch.zeros(x_TD.shape[0], E), self.apply_on_input)


def make_placement(name: str, world_size: int) -> ExpertPlacement:
    if name == "linear":
        return ExpertPlacement.linear(E, world_size)
    if name == "round_robin":
        return ExpertPlacement.round_robin(E, world_size)
    return ExpertPlacement.balanced(ZIPF_E, world_size, num_redundant=world_size)


def exclusive_experts(placement: ExpertPlacement, rank: int) -> list[int]:
    """Experts whose every replica lives on ``rank``."""
    S = placement.slots_per_rank
    return sorted(e for e in set(placement.local_experts(rank))
                  if all(p // S == rank for p, q in enumerate(placement.phy2log) if q == e))


def make_routing(name: str, rank: int, world_size: int, placement: ExpertPlacement, g: torch.Generator):
    """``(T, K, ids_TK or None for the layer's own router, weights_TK, apply_on_input)``."""
    T, K = 33, 2

    def weights(T: int, K: int) -> torch.Tensor:
        return torch.softmax(torch.randn(T, K, generator=g), -1)

    def choose(T: int, K: int, pool: list[int]) -> torch.Tensor:  # K distinct experts of pool per token
        return torch.tensor(pool)[torch.rand(T, len(pool), generator=g).argsort(1)[:, :K]]

    if name == "router":
        return T, K, None, None, False
    if name in ("balanced", "apply_on_input"):
        return T, K, choose(T, K, list(range(E))), weights(T, K), name == "apply_on_input"
    if name == "zipf":
        ids = torch.multinomial(torch.tensor(ZIPF_E).expand(T, E), K, replacement=False, generator=g)
        return T, K, ids, weights(T, K), False
    if name == "one_expert":  # expert 0: the hottest, replicated by EPLB
        return 17, 1, torch.zeros(17, 1, dtype=torch.long), weights(17, 1), False
    if name == "t1":
        return 1, K, choose(1, K, list(range(E))), weights(1, K), False
    if name == "rank_sends_nothing":  # the last rank has no tokens at all but must still take part
        T = 0 if rank == world_size - 1 else 9
        return T, K, choose(T, K, list(range(E))), weights(T, K), False
    if name == "rank_receives_nothing":  # every token goes to rank 0's own experts
        return T, K, choose(T, K, exclusive_experts(placement, 0)), weights(T, K), False
    if name == "all_local":  # every rank keeps its tokens: nothing crosses ranks
        return T, K, choose(T, K, exclusive_experts(placement, rank)), weights(T, K), False
    raise ValueError(name)


def build_layer(K: int) -> MoE:
    torch.manual_seed(0)  # same weights on every rank
    layer = MoE(MoEConfig(D, F_, E, K, shared_ffn_size=SHARED_F))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.2)
    return layer


def run_case(rank: int, world_size: int, case: str) -> float:
    placement_name, dispatcher, routing_name = case.split("/")
    placement = make_placement(placement_name, world_size)
    g = torch.Generator().manual_seed(1000 * rank + CASES.index(case))
    T, K, ids, weights, apply_on_input = make_routing(routing_name, rank, world_size, placement, g)
    layer = build_layer(K)
    if ids is not None:
        layer.router = FixedRouter(ids, weights, apply_on_input)
    x = torch.randn(T, D, generator=g)
    with torch.no_grad():
        expected = layer(x) if T else torch.empty(0, D)  # the single-process layer (T=0 is not supported there)
        shard_moe(layer, placement=placement, timeout_s=20, **DISPATCHERS[dispatcher])
        assert len(layer.experts.w13_E2FD) == placement.slots_per_rank
        got = layer(x)
    assert got.shape == expected.shape and got.dtype == x.dtype, (got.shape, got.dtype)
    return 0.0 if T == 0 else ((got - expected).norm() / expected.norm()).item()


def run_model_case(rank: int, world_size: int) -> float:
    """A model with two MoE layers, each with its own placement; bad placements are refused."""
    torch.manual_seed(1)
    model = nn.Sequential(build_layer(2), nn.Linear(D, D), build_layer(2))
    _, _, ids, weights, _ = make_routing("zipf", rank, world_size, None, torch.Generator().manual_seed(rank))
    model[0].router = FixedRouter(ids, weights)
    x = torch.randn(33, D, generator=torch.Generator().manual_seed(50 + rank))
    with torch.no_grad():
        expected = model(x)
        with pytest.raises(ValueError, match=f"placement for '0' is for 8 experts on {2 * world_size} ranks"):
            shard_moe(model, placement=ExpertPlacement.linear(E, 2 * world_size))
        placements = {"0": make_placement("eplb_redundant", world_size), "2": make_placement("round_robin", world_size)}
        shard_moe(model, placement=placements, dispatcher="all_to_all", timeout_s=20)
        assert [m.expert_placement for m in (model[0], model[2])] == [placements["0"], placements["2"]]
        got = model(x)
    return ((got - expected).norm() / expected.norm()).item()


def ep_matrix(rank: int, world_size: int) -> dict[str, float | str]:
    out: dict[str, float | str] = {}
    for case in CASES + [MODEL_CASE]:
        try:
            out[case] = run_model_case(rank, world_size) if case == MODEL_CASE else run_case(rank, world_size, case)
        except Exception:  # noqa: BLE001 -- reported per case
            out[case] = traceback.format_exc()
    return out


@pytest.fixture(scope="module")
def ep_results():
    cache: dict[int, dict[str, list]] = {}

    def get(world_size: int) -> dict[str, list]:
        if world_size not in cache:
            per_rank = [r.unwrap() for r in run_ranks(ep_matrix, world_size, timeout_s=300)]
            cache[world_size] = {case: [res[case] for res in per_rank] for case in CASES + [MODEL_CASE]}
        return cache[world_size]

    return get


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("case", CASES + [MODEL_CASE])
def test_ep_layer_matches_single_process(ep_results, world_size, case):
    per_rank = ep_results(world_size)[case]
    errors = [v for v in per_rank if isinstance(v, str)]
    assert not errors, errors[0]
    assert max(per_rank) <= 1e-5, per_rank


def deepspeed_parity(rank: int, world_size: int) -> dict[str, float]:
    """DeepSpeed-MoE with ep_size=world_size and our sharded layer, same weights, same per-rank tokens."""
    import deepspeed
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    from moe import Activation
    from routing import RouterConfig, Scoring

    deepspeed.init_distributed(dist_backend="gloo")  # wraps the group the harness initialised
    errors = {}
    for k, act, activation in ((1, nn.ReLU(), Activation.RELU), (2, nn.GELU(), Activation.GELU)):
        torch.manual_seed(0)
        ours = MoE(MoEConfig(D, F_, E, k, activation, RouterConfig(E, k, Scoring.SOFTMAX, renormalize=k >= 2),
                             expert_bias=True))
        with torch.no_grad():
            for p in ours.parameters():
                p.normal_(0.0, 0.2)
        ds = DeepSpeedMoE(D, nn.Sequential(nn.Linear(D, F_), act, nn.Linear(F_, D)), num_experts=E,
                          ep_size=world_size, k=k, drop_tokens=False, min_capacity=0,
                          top2_2nd_expert_sampling=False).eval()
        ds.set_deepspeed_parallelism()
        L = E // world_size
        ex = ours.experts
        with torch.no_grad():  # DeepSpeed's rank r holds experts r*L .. r*L + L-1: our linear placement
            ds.deepspeed_moe.gate.wg.weight.copy_(ours.router.weight)
            for j, expert in enumerate(ds.deepspeed_moe.experts.deepspeed_experts):
                fc1, fc2 = expert[0], expert[2]
                e = rank * L + j
                fc1.weight.copy_(ex.w13_E2FD[e]), fc1.bias.copy_(ex.b13_E2F[e])
                fc2.weight.copy_(ex.w2_EDF[e]), fc2.bias.copy_(ex.b2_ED[e])
            x = torch.randn(1, 21, D, generator=torch.Generator().manual_seed(rank))
            expected = ds(x)[0]
            shard_moe(ours, timeout_s=30)
            got = ours(x)
        errors[f"k={k}"] = ((got - expected).norm() / expected.norm()).item()
    return errors


@pytest.mark.slow
def test_sharded_layer_matches_deepspeed_moe_ep2():
    pytest.importorskip("deepspeed", reason="deepspeed not installed (pip install '.[deepspeed]')")
    per_rank = [r.unwrap() for r in run_ranks(deepspeed_parity, 2, timeout_s=300)]
    print("relative error vs DeepSpeed-MoE ep_size=2, per rank:", per_rank)
    assert all(err <= 1e-5 for errs in per_rank for err in errs.values()), per_rank
