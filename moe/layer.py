"""``MoE``: the drop-in mixture-of-experts layer.

Shape legend: T tokens, D hidden, E experts, K top-k, R routed rows after dispatch.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
from torch import nn

from all_to_all.dispatcher import Dispatcher, LocalDispatcher
from hypermoe import HyperMoELayer, HyperNetwork
from moe.backends import cpu_decode_moe
from moe.config import Backend, MoEConfig
from moe.deepspeed_interop import moe_from_deepspeed
from moe.experts import Experts
from moe.hf import moe_from_hf
from moe.shared import SharedExpert
from moe.triton_backend import check_supported, triton_moe_forward  # imports triton only when called
from quant.fp8_experts import Fp8Experts
from routing.router import Router, Routing


class MoE(nn.Module):
    """``MoE(MoEConfig(hidden_size, ffn_size, num_experts, top_k, ...))(x[..., D]) -> y[..., D]``.

    Forward: route -> shuffle rows by expert -> grouped expert FFN -> weighted combine (+ shared expert).
    Dropless: every routed row is computed, experts with no rows cost nothing. Output dtype = input dtype.
    """

    def __init__(
        self, config: MoEConfig, dispatcher: Dispatcher | None = None, hypernetwork: HyperNetwork | None = None
    ) -> None:
        super().__init__()
        self.config = config
        assert config.router is not None  # MoEConfig.__post_init__ fills it in
        self.router = Router(config.router, config.hidden_size)
        self.experts = Fp8Experts(config) if config.quant is not None else Experts(config)
        self.shared_expert = (
            SharedExpert(config.hidden_size, config.shared_ffn_size, config.shared_activation or config.activation,
                         config.shared_expert_gate, config.swiglu_alpha, config.swiglu_limit,
                         (config.swiglu_gate_softcap, config.swiglu_up_softcap))
            if config.shared_ffn_size
            else None
        )
        self.dispatcher = dispatcher if dispatcher is not None else LocalDispatcher(config.num_experts)
        if config.backend is Backend.TRITON and config.activation.torch_only:
            raise ValueError(f"activation {config.activation.value!r} has no Triton kernel epilogue: use "
                             "backend='torch' (or 'auto', which picks it)")
        self.backend = resolve_backend(config.backend, config.activation.torch_only)
        if self.backend is Backend.TRITON:
            check_supported(config)
        # HyperMoE (config.hypermoe): a HyperExpert from the unselected experts; pass a shared `hypernetwork`
        # (or call hypermoe.share_hypernetwork(model) afterwards) to use one for all layers, as the paper does.
        if hypernetwork is not None and config.hypermoe is None:
            raise ValueError("hypernetwork given but config.hypermoe is None")
        self.hypermoe = (
            HyperMoELayer(config.hypermoe, config.num_experts, config.top_k, config.hidden_size, hypernetwork)
            if config.hypermoe is not None
            else None
        )
        # RMSNorm on the block's output, routed and shared experts summed (A.X-K1's post_mlp_layernorm)
        self.output_norm = nn.Parameter(torch.ones(config.hidden_size)) if config.output_norm_eps is not None \
            else None
        # Observer of every routing decision (routing.stats.RoutingStats.attach sets it); None costs nothing.
        self.on_routing: Callable[[Routing], None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_routing(x)[0]

    def forward_with_routing(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        """``forward`` that also returns the router's decision (for HF blocks that return router outputs)."""
        D = self.config.hidden_size
        if x.shape[-1] != D:
            raise ValueError(f"input hidden size ({x.shape[-1]}) does not match hidden_size ({D})")
        x_TD = x.reshape(-1, D)
        routing = self.router(x_TD)
        if self.on_routing is not None:
            self.on_routing(routing)
        # 1. rows to their experts (sorted by expert), 2. grouped FFN, 3. weighted sum back per token
        fused = isinstance(self.dispatcher, LocalDispatcher) and type(self.experts) in (Experts, Fp8Experts)
        # The Triton kernels are inference-only: under autograd the torch path (differentiable) runs instead.
        wants_grad = torch.is_grad_enabled() and (x_TD.requires_grad or self.experts.w13_E2FD.requires_grad)
        y_TD = None
        if self.backend is Backend.TRITON and fused and not wants_grad:
            y_TD = triton_moe_forward(x_TD, routing, self.experts, self.config.deterministic)
        elif self.backend is Backend.TORCH and fused and not wants_grad and type(self.experts) is Experts:
            y_TD = cpu_decode_moe(x_TD, routing, self.experts)  # two C calls; None unless CPU decode-sized
        if y_TD is None:
            x_RD, counts, meta = self.dispatcher.dispatch(x_TD, routing)
            y_RD = self.experts(x_RD, counts)
            y_TD = self.dispatcher.combine(y_RD, meta)
        if self.shared_expert is not None:
            y_TD = y_TD + self.shared_expert(x_TD)
        if self.hypermoe is not None:
            y_TD = y_TD + self.hypermoe(x_TD, routing.ids_TK)
        eps = self.config.output_norm_eps
        if self.output_norm is not None and eps is not None:  # in fp32, then the weight in the input's dtype (as
            # transformers' RMSNorm); the weight exists exactly when the eps is set
            y32 = y_TD.float()
            y32 = y32 * torch.rsqrt(y32.pow(2).mean(-1, keepdim=True) + eps)
            y_TD = self.output_norm * y32.to(x.dtype)
        return y_TD.to(x.dtype).reshape(x.shape), routing

    @classmethod
    def from_hf(cls, block: nn.Module) -> MoE:
        """Build from a ``transformers`` MoE block, sharing its weights where layouts agree."""
        return moe_from_hf(block, cls)

    @classmethod
    def from_deepspeed(cls, ds_moe: nn.Module) -> MoE:
        """Build from a ``deepspeed.moe.layer.MoE`` whose experts are Linear-activation-Linear MLPs."""
        return moe_from_deepspeed(ds_moe, cls)


def resolve_backend(requested: Backend, torch_only: bool = False) -> Backend:
    """Pick the backend once, from the config and a capability probe (never inside ``forward``). ``torch_only``:
    the experts' activation has no Triton epilogue, so ``auto`` picks torch."""
    has_triton = importlib.util.find_spec("triton") is not None
    if requested is Backend.TRITON:
        if not has_triton:
            raise ImportError("backend='triton' needs triton: pip install triton")
        return Backend.TRITON
    if requested is Backend.AUTO and has_triton and torch.cuda.is_available() and not torch_only:
        return Backend.TRITON
    return Backend.TORCH
