"""``MoEConfig``: everything that defines an MoE layer's math, validated on construction."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from hypermoe.config import HyperMoEConfig
from moe.fields import enum_field
from routing.config import RouterConfig, Scoring


class Activation(str, enum.Enum):
    """Expert MLP activations. Gated ones keep gate rows then up rows in ``w13`` (``2F`` rows)."""

    SWIGLU = "swiglu"  # silu(gate) * up (Mixtral, Qwen, OLMoE, DeepSeek, Llama 4)
    GEGLU = "geglu"  # gelu(gate) * up
    SWIGLU_OAI = "swiglu_oai"  # gpt-oss: clamped gate/up, gate * sigmoid(alpha * gate) * (up + 1)
    SWIGLU_CLAMPED = "swiglu_clamped"  # GLM-5-Next, HY-V4: silu(min(gate, limit)) * clamp(up, -limit, limit)
    GELU = "gelu"  # plain 2-layer MLP: gelu(up) ; w13 holds F rows
    RELU = "relu"  # plain 2-layer MLP: relu(up)
    RELU2 = "relu2"  # plain 2-layer MLP: relu(up) ** 2 (Nemotron-H)
    # Inkling 2: softcap(gate, gate_softcap) * sigmoid(gate) * softcap(up, up_softcap), softcap(x, c) = c tanh(x / c)
    SWIGLU_SOFTCAPPED = "swiglu_softcapped"

    @property
    def gated(self) -> bool:
        return self in (Activation.SWIGLU, Activation.GEGLU, Activation.SWIGLU_OAI, Activation.SWIGLU_CLAMPED,
                        Activation.SWIGLU_SOFTCAPPED)

    @property
    def torch_only(self) -> bool:
        """Computed by the torch backend only: the Triton (and FP8 Triton) kernels have no epilogue for it."""
        return self in (Activation.RELU2, Activation.SWIGLU_SOFTCAPPED)


class Quant(str, enum.Enum):
    """Routed-expert weight formats other than the layer's dtype; routers, shared experts and gates keep theirs."""

    FP8_CHANNEL = "fp8-channel"  # e4m3 weights, one fp32 scale per output row
    FP8_BLOCK = "fp8-block"  # e4m3 weights, one fp32 scale per 128x128 block (DeepSeek-V3 weight_scale_inv)

    @property
    def scheme(self) -> str:
        """The ``quant.Scheme`` value: ``"channel"`` or ``"block"``."""
        return self.value.removeprefix("fp8-")


class Backend(str, enum.Enum):
    AUTO = "auto"  # triton where a GPU and triton are present, else torch
    TORCH = "torch"  # plain torch: the fast CPU path; also runs on CUDA
    TRITON = "triton"  # Triton grouped-GEMM kernels (GPU, or the interpreter)


@dataclass
class MoEConfig:
    """The math of one MoE layer.

    Required: ``hidden_size`` (D), ``ffn_size`` (F, per expert), ``num_experts`` (E), ``top_k`` (K).
    ``router`` defaults to a softmax top-k router with renormalised weights; pass a
    :class:`routing.RouterConfig` (its ``num_experts``/``top_k`` must match) for other families.
    ``quant`` (``"fp8-channel"`` or ``"fp8-block"``) stores the routed experts in e4m3 (``quant.Fp8Experts``).
    """

    hidden_size: int
    ffn_size: int
    num_experts: int
    top_k: int
    activation: Activation = Activation.SWIGLU
    router: RouterConfig | None = None
    expert_bias: bool = False  # biases on both expert projections (gpt-oss)
    swiglu_alpha: float = 1.702  # gpt-oss SWIGLU_OAI only
    swiglu_limit: float = 7.0  # the clamp of SWIGLU_OAI and SWIGLU_CLAMPED
    shared_ffn_size: int = 0  # 0: no shared expert; else the shared (always-on) gated MLP's F
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(Linear(D, 1)) scales the shared expert
    backend: Backend = Backend.AUTO
    # Batch-invariant combine (fixed summation order, no atomics). The torch backend always combines this way.
    deterministic: bool = False
    extra: dict = field(default_factory=dict)  # free-form provenance (e.g. the HF class it came from)
    hypermoe: HyperMoEConfig | None = None  # None: off; else a HyperExpert from the unselected experts
    quant: Quant | None = None  # None: experts in the layer's dtype; else FP8 experts (quant.Fp8Experts)
    shared_activation: Activation | None = None  # the shared expert's, where it differs from ``activation``
    swiglu_gate_softcap: float = 4.0  # SWIGLU_SOFTCAPPED only: the softcap of the gate's linear factor
    swiglu_up_softcap: float = 25.0  # SWIGLU_SOFTCAPPED only: the softcap of up
    output_norm_eps: float | None = None  # an RMSNorm (weight ``MoE.output_norm``) on the block's output (A.X-K1)

    def __post_init__(self) -> None:
        self.activation = enum_field(Activation, "activation", self.activation)
        if self.shared_activation is not None:
            self.shared_activation = enum_field(Activation, "shared_activation", self.shared_activation)
        self.backend = enum_field(Backend, "backend", self.backend)
        if self.quant is not None:
            self.quant = enum_field(Quant, "quant", self.quant)
        for name in ("hidden_size", "ffn_size", "num_experts", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} ({value!r}) must be a positive integer")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        if self.output_norm_eps is not None and not self.output_norm_eps > 0:
            raise ValueError(f"output_norm_eps ({self.output_norm_eps!r}) must be > 0 or None")
        if min(self.swiglu_gate_softcap, self.swiglu_up_softcap) <= 0:
            raise ValueError(f"softcaps ({self.swiglu_gate_softcap}, {self.swiglu_up_softcap}) must be > 0")
        if self.shared_ffn_size < 0:
            raise ValueError(f"shared_ffn_size ({self.shared_ffn_size}) must be >= 0")
        if self.shared_expert_gate and not self.shared_ffn_size:
            raise ValueError("shared_expert_gate (True) needs a shared expert (shared_ffn_size > 0)")
        if isinstance(self.hypermoe, dict):
            self.hypermoe = HyperMoEConfig(**self.hypermoe)
        if self.hypermoe is not None and not isinstance(self.hypermoe, HyperMoEConfig):
            raise ValueError(f"hypermoe ({self.hypermoe!r}) must be a HyperMoEConfig or None")
        if self.router is None:
            self.router = RouterConfig(num_experts=self.num_experts, top_k=self.top_k, scoring=Scoring.SOFTMAX)
        elif (self.router.num_experts, self.router.top_k) != (self.num_experts, self.top_k):
            raise ValueError(
                f"router (num_experts={self.router.num_experts}, top_k={self.router.top_k}) does not match "
                f"num_experts ({self.num_experts}) and top_k ({self.top_k})"
            )

    @property
    def w13_rows(self) -> int:
        """Rows of one expert's first projection: ``2F`` for gated activations, ``F`` otherwise."""
        return 2 * self.ffn_size if self.activation.gated else self.ffn_size
