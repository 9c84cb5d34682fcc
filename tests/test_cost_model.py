"""The communication cost model: fitting recovers a link, and predictions follow the topology."""

import pytest

from all_to_all.cost_model import (
    H100_NVLINK_IB,
    INFINIBAND_NDR,
    NVLINK_H100,
    Link,
    Step,
    fit_link,
    local_cluster,
    predict_all_gather,
    predict_all_to_all,
)


def test_fit_link_recovers_the_generating_link():
    truth = Link("truth", overhead_s=50e-6, latency_s=20e-6, bandwidth_Bps=2e9)
    samples = [(p, b, truth.overhead_s + truth.transfer_s(p, b)) for p in (1, 2, 3) for b in (1e3, 1e5, 1e7)]
    fitted = fit_link(samples)
    assert fitted.overhead_s == pytest.approx(truth.overhead_s, rel=1e-6)
    assert fitted.latency_s == pytest.approx(truth.latency_s, rel=1e-6)
    assert fitted.bandwidth_Bps == pytest.approx(truth.bandwidth_Bps, rel=1e-6)


def test_fit_link_needs_samples():
    with pytest.raises(ValueError, match="samples"):
        fit_link([(1, 1e3, 1e-4)])


def test_one_node_uses_nvlink_only_and_more_nodes_are_bound_by_infiniband():
    nbytes = 64e6
    one_node = H100_NVLINK_IB.exchange_s(8, nbytes)
    assert one_node == pytest.approx(NVLINK_H100.overhead_s + NVLINK_H100.transfer_s(7, nbytes * 7 / 8))
    two_nodes = H100_NVLINK_IB.exchange_s(16, nbytes)
    assert two_nodes == pytest.approx(INFINIBAND_NDR.overhead_s + INFINIBAND_NDR.transfer_s(8, nbytes * 8 / 16))
    assert two_nodes > 3 * one_node  # half the bytes, 8x less bandwidth


def test_all_to_all_moves_less_than_all_gather_and_skew_costs_time():
    step = Step(tokens=4096, hidden=7168, top_k=8, slots_per_rank=8, dispatch_bytes=1, combine_bytes=2)
    for W in (8, 32, 256):
        a2a_dispatch, a2a_combine = predict_all_to_all(H100_NVLINK_IB, W, step)
        gather_dispatch, gather_combine = predict_all_gather(H100_NVLINK_IB, W, step)
        assert a2a_dispatch.total_s < gather_dispatch.total_s and a2a_combine.total_s < gather_combine.total_s
    skewed = Step(4096, 7168, 8, 8, 1, 2, imbalance=1.5)
    skewed_dispatch, _ = predict_all_to_all(H100_NVLINK_IB, 64, skewed)
    assert skewed_dispatch.comm_s > predict_all_to_all(H100_NVLINK_IB, 64, step)[0].comm_s


def test_host_sync_is_charged_to_all_to_all_dispatch_only():
    step = Step(tokens=1, hidden=64, top_k=1, slots_per_rank=1)
    slow_sync, no_sync = local_cluster(host_sync_s=1.0), local_cluster(host_sync_s=0.0)
    slow_dispatch, _ = predict_all_to_all(slow_sync, 2, step)
    assert slow_dispatch.local_s - predict_all_to_all(no_sync, 2, step)[0].local_s == pytest.approx(1.0)
    assert predict_all_gather(slow_sync, 2, step) == predict_all_gather(no_sync, 2, step)
