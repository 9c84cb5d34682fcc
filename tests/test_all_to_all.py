"""EP dispatchers on gloo ranks: exact bytes, fp8/bf16 payloads, empty ranks, and dead or hung ranks.

Layer-level equality with the single-process layer is in ``test_expert_parallel.py``; here the dispatchers
are driven directly with identity experts (``y_RD = x_RD``) so that payloads can be compared bit for bit.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
import torch.distributed as dist

from all_to_all import AllGatherDispatcher, AllToAllDispatcher, CollectiveError, EPComm, LocalDispatcher, SlotTable
from all_to_all.slots import assign_slots
from expert_parallel import ExpertPlacement, shard_moe
from moe import MoE, MoEConfig
from routing.router import Routing
from tests.dist_harness import run_ranks

D, E, K = 24, 8, 2


def test_assign_slots_docstring_example():
    table = SlotTable.from_phy2log([0, 1, 2, 0], num_experts=3, num_ranks=2)
    ids_TK = torch.tensor([[0, 1], [0, 2], [0, 1]], dtype=torch.int32)
    assert assign_slots(ids_TK, table, 0).tolist() == [[0, 1], [3, 2], [0, 1]]
    assert assign_slots(ids_TK, table, 1).tolist() == [[3, 1], [0, 2], [3, 1]]


def test_assign_slots_splits_replicas_evenly():
    table = ExpertPlacement(tuple(range(8)) + (0, 0, 0, 0), 8, 4).slot_table()  # expert 0 in 5 slots
    ids_TK = torch.zeros(50, 1, dtype=torch.int32)
    for rank in range(4):
        counts = torch.bincount(assign_slots(ids_TK, table, rank).view(-1), minlength=12)
        assert counts[[0, 8, 9, 10, 11]].tolist() == [10] * 5 and counts.sum() == 50


@pytest.mark.parametrize("phy2log, experts, ranks, match", [
    ([0, 1, 2], 3, 2, "multiple of num_ranks"),
    ([0, 1, 0, 1], 3, 2, "no slot"),
    ([0, 5], 2, 1, "outside"),
])
def test_slot_table_rejects_bad_placements(phy2log, experts, ranks, match):
    with pytest.raises(ValueError, match=match):
        SlotTable.from_phy2log(phy2log, experts, ranks)


def _routing(T: int, g: torch.Generator) -> Routing:
    ids_TK = torch.rand(T, E, generator=g).argsort(1)[:, :K].to(torch.int32)
    return Routing(torch.softmax(torch.randn(T, K, generator=g), -1), ids_TK, torch.zeros(T, E))


def _round_trip(dispatcher, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
    """dispatch -> identity experts -> combine."""
    x_RD, counts_L, meta = dispatcher.dispatch(x_TD, routing)
    assert x_RD.dtype == x_TD.dtype and counts_L.dtype == torch.int32
    return dispatcher.combine(x_RD.float(), meta)


def payload_checks(rank: int, world_size: int) -> dict[str, object]:
    """Bytes handed to all_to_all_single, fp8/bf16 transport, and ranks with no tokens."""
    out: dict[str, object] = {}
    handed: list[tuple[int, int]] = []
    original = dist.all_to_all_single

    def counting(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        handed.append((input.numel() * input.element_size(), output.numel() * output.element_size()))
        return original(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    dist.all_to_all_single = counting
    g = torch.Generator().manual_seed(rank)
    table = ExpertPlacement.balanced([(e + 1) ** -1.2 for e in range(E)], world_size, world_size).slot_table()
    # 1. a bf16 AllToAll layer step: counts, then exactly T*K rows out, R rows back
    T = 5 + 7 * rank
    layer = MoE(MoEConfig(D, 16, E, K))
    shard_moe(layer, placement=ExpertPlacement(table.slot_to_expert_P.tolist(), E, world_size), timeout_s=20)
    with torch.no_grad():
        layer(torch.randn(T, D, generator=g).bfloat16())
    R = handed[1][1] // (D * 2)  # rows this rank received (its experts' work)
    out["bytes"] = dict(handed=list(handed), T=T, R=R, stats=dict(layer.dispatcher.stats.bytes_sent))
    dist.all_to_all_single = original
    # 2. fp8 and bf16 payloads through both dispatchers, against LocalDispatcher (bit-exact for K=2)
    local = LocalDispatcher(E)
    for name, dtype in (("fp8", torch.float8_e4m3fn), ("bf16", torch.bfloat16)):
        for kind in ("all_to_all", "all_gather"):
            comm = EPComm(timeout_s=20)
            disp = AllToAllDispatcher(table, comm) if kind == "all_to_all" else AllGatherDispatcher(table, comm, 32)
            x_TD, routing = torch.randn(19, D, generator=g).to(dtype), _routing(19, g)
            out[f"{name}/{kind}"] = torch.equal(_round_trip(disp, x_TD, routing), _round_trip(local, x_TD, routing))
    # 3. every rank with zero tokens: all collectives still run, the result is empty
    for kind in ("all_to_all", "all_gather"):
        disp = AllToAllDispatcher(table, EPComm()) if kind == "all_to_all" else AllGatherDispatcher(table, EPComm())
        y = _round_trip(disp, torch.empty(0, D), _routing(0, g))
        out[f"empty/{kind}"] = tuple(y.shape)
    with pytest.raises(ValueError, match="max_tokens"):
        AllGatherDispatcher(table, EPComm(), max_tokens=4).dispatch(torch.randn(5, D), _routing(5, g))
    return out


@pytest.fixture(scope="module")
def payload_results():
    return [r.unwrap() for r in run_ranks(payload_checks, 2, timeout_s=120)]


def test_all_to_all_moves_exactly_the_routed_rows(payload_results):
    total_rows = sum(r["bytes"]["T"] * K for r in payload_results)
    received_rows = sum(r["bytes"]["R"] for r in payload_results)
    assert received_rows == total_rows
    for r in payload_results:
        b = r["bytes"]
        counts_call, dispatch_call, combine_call = b["handed"]
        W = len(payload_results)
        assert counts_call[0] == (E + W) * 4  # int32 count per physical slot
        assert dispatch_call == (b["T"] * K * D * 2, b["R"] * D * 2)  # bf16 rows, no padding
        assert combine_call == (b["R"] * D * 4, b["T"] * K * D * 4)  # fp32 expert outputs back
        assert b["stats"]["dispatch"] == dispatch_call[0] and b["stats"]["combine"] == combine_call[0]
        print(f"T={b['T']}: dispatch {dispatch_call[0]} B = {b['T']}x{K}x{D}x2, combine {combine_call[0]} B")


@pytest.mark.parametrize("case", ["fp8/all_to_all", "fp8/all_gather", "bf16/all_to_all", "bf16/all_gather"])
def test_payload_dtypes_round_trip_bit_exact(payload_results, case):
    assert all(r[case] for r in payload_results)


def test_ranks_without_tokens_take_part(payload_results):
    for r in payload_results:
        assert r["empty/all_to_all"] == (0, D) and r["empty/all_gather"] == (0, D)


def _layer_for_failures(world_size: int, timeout_s: float) -> MoE:
    torch.manual_seed(0)
    placement = ExpertPlacement.balanced([1.0] * E, world_size, num_redundant=-E % world_size)  # 3 ranks: +1 slot
    return shard_moe(MoE(MoEConfig(D, 16, E, K)), placement=placement, timeout_s=timeout_s)


def die_or_hang_mid_step(rank: int, world_size: int, victim: int, how: str, timeout_s: float):
    """Step 1 completes; in step 2 the victim dies (SIGKILL) or hangs after dispatch, inside its experts."""
    layer = _layer_for_failures(world_size, timeout_s)
    x = torch.randn(16, D)
    with torch.no_grad():
        layer(x)
        if rank == victim:
            forward = layer.experts.forward

            def fail(x_RD, counts):
                if how == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(10 * timeout_s)
                return forward(x_RD, counts)

            layer.experts.forward = fail
        start = time.perf_counter()
        try:
            layer(x)
        except CollectiveError as err:
            elapsed = time.perf_counter() - start
            time.sleep(1.0)  # rank 0 hosts the store: let the other survivors finish their diagnosis
            return str(err), elapsed
    return "no error", time.perf_counter() - start


@pytest.mark.parametrize("world_size, victim, how, timeout_s", [(3, 1, "kill", 8.0), (2, 1, "hang", 4.0)])
def test_dead_or_hung_rank_is_named_within_timeout(world_size, victim, how, timeout_s):
    survivors = set(range(world_size)) - {victim}
    results = run_ranks(die_or_hang_mid_step, world_size, victim, how, timeout_s, timeout_s=120, barrier=False,
                        wait_for=survivors)
    for rank in survivors:
        message, elapsed = results[rank].unwrap()
        print(f"rank {rank}: raised after {elapsed:.2f} s (timeout {timeout_s} s): {message[:160]}")
        assert f"dead or hung: {victim}." in message, message
        assert elapsed <= timeout_s + 0.5


def test_comm_needs_an_initialised_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        EPComm()
