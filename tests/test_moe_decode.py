"""The MoE C kernel of the engine's decode step (``moe.kernels.moe_decode``) against ``moe.MoE``'s torch path."""

from __future__ import annotations

import pytest
import torch

from moe import MoE, MoEConfig
from moe.kernels.moe_decode import moe_decode, moe_decode_available
from routing.config import RouterConfig

pytestmark = pytest.mark.skipif(not moe_decode_available(), reason="needs a C compiler and AVX2")


@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "no-renorm"])
@pytest.mark.parametrize("D, F, E, K", [(64, 48, 8, 2), (40, 20, 6, 3), (36, 13, 4, 1)],
                         ids=["tiles", "D%8=0,F%8!=0", "no-tiles"])
@pytest.mark.parametrize("T", [1, 5, 32])
def test_same_output_and_routing_as_the_layer(renormalize, D, F, E, K, T):
    torch.manual_seed(T + D)
    layer = MoE(MoEConfig(hidden_size=D, ffn_size=F, num_experts=E, top_k=K,
                          router=RouterConfig(E, K, renormalize=renormalize))).eval()
    x = torch.randn(T, D)
    with torch.no_grad():
        ref, routing = layer.forward_with_routing(x)
    y, ids, weights, logits = moe_decode(x, layer.router.weight, layer.experts.w13_E2FD, layer.experts.w2_EDF, K,
                                         renormalize)
    assert torch.equal(ids, routing.ids_TK) and ids.dtype == torch.int32
    torch.testing.assert_close(weights, routing.weights_TK, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits, routing.logits_TE, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
