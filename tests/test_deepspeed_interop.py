"""``MoE.from_deepspeed`` matches DeepSpeed-MoE (``drop_tokens=False``) on the same weights."""

import socket

import pytest
import torch
from torch import nn

from moe import MoE

deepspeed = pytest.importorskip("deepspeed", reason="deepspeed not installed (pip install '.[deepspeed]')")


@pytest.fixture(scope="module")
def single_process_group():
    import torch.distributed as dist

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _ds_layer(k: int, act: nn.Module, E: int = 6, D: int = 40, F: int = 24):
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    expert = nn.Sequential(nn.Linear(D, F), act, nn.Linear(F, D))
    layer = DeepSpeedMoE(D, expert, num_experts=E, ep_size=1, k=k, drop_tokens=False, min_capacity=0,
                         top2_2nd_expert_sampling=False).eval()
    with torch.no_grad():
        for p in layer.parameters():  # DeepSpeed deep-copies one expert: make each different
            p.normal_(0.0, 0.2)
    return layer


@pytest.mark.parametrize("k, act", [(1, nn.GELU()), (2, nn.ReLU()), (3, nn.GELU())])
@pytest.mark.parametrize("T", [1, 33])
def test_outputs_match_deepspeed(single_process_group, k, act, T):
    ds = _ds_layer(k, act)
    ours = MoE.from_deepspeed(ds)
    assert ours.router.weight is ds.deepspeed_moe.gate.wg.weight
    x = torch.randn(1, T, 40)
    with torch.no_grad():
        expected, _, _ = ds(x)
        got = ours(x)
    assert ((got - expected).norm() / expected.norm()).item() <= 1e-5


def test_dropping_layer_is_refused(single_process_group):
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    ds = DeepSpeedMoE(16, nn.Sequential(nn.Linear(16, 8), nn.GELU(), nn.Linear(8, 16)), num_experts=4, k=1)
    with pytest.raises(ValueError, match="drop_tokens"):
        MoE.from_deepspeed(ds)
