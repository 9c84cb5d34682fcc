"""``DecoderConfig``: the decoder's shape and per-family switches, read from a Hugging Face ``config.json``."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from hypermoe import HyperMoEConfig
from moe.config import Activation, Backend, MoEConfig
from routing.config import RouterConfig, Scoring


class QKNorm(str, enum.Enum):
    """RMSNorm on queries and keys before RoPE."""

    NONE = "none"
    HEAD = "head"  # per head, over head_dim (Qwen3-MoE)
    FULL = "full"  # over all heads at once, weights [H*Dh] and [Hkv*Dh] (OLMoE)


@dataclass
class DecoderConfig:
    """A GQA decoder with RoPE, RMSNorm and MoE (or dense SwiGLU) feed-forward blocks.

    ``dense_layers`` lists the layers whose feed-forward is a dense SwiGLU MLP of ``dense_ffn_size``
    (Qwen-MoE's ``mlp_only_layers`` / ``decoder_sparse_step``); every other layer is an MoE block.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    num_experts: int
    top_k: int
    moe_ffn_size: int
    norm_topk_prob: bool = True
    shared_ffn_size: int = 0
    shared_expert_gate: bool = False
    dense_ffn_size: int = 0
    dense_layers: tuple[int, ...] = ()
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    qk_norm: QKNorm = QKNorm.NONE
    attention_bias: bool = False  # biases on q/k/v projections
    o_proj_bias: bool = False
    clip_qkv: float | None = None
    tie_word_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    hypermoe: HyperMoEConfig | None = None  # our config.json extension key "hypermoe" (HyperMoEConfig fields)
    extra: dict = field(default_factory=dict)
    moe_backend: Backend = Backend.AUTO  # the MoE layers' backend (the loader picks it from the device)

    def __post_init__(self) -> None:
        self.qk_norm = QKNorm(self.qk_norm)
        self.dense_layers = tuple(sorted(set(self.dense_layers)))
        self.eos_token_ids = tuple(self.eos_token_ids)
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "max_position_embeddings", "num_experts", "top_k", "moe_ffn_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} ({value!r}) must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")
        if any(not 0 <= i < self.num_layers for i in self.dense_layers):
            raise ValueError(f"dense_layers ({self.dense_layers}) must lie in [0, {self.num_layers})")
        if self.dense_layers and self.dense_ffn_size < 1:
            raise ValueError(f"dense_ffn_size ({self.dense_ffn_size}) must be >= 1 when there are dense layers")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta ({self.rope_theta}) must be > 0")

    def is_moe_layer(self, layer: int) -> bool:
        return layer not in self.dense_layers

    def moe_config(self) -> MoEConfig:
        router = RouterConfig(self.num_experts, self.top_k, scoring=Scoring.SOFTMAX, renormalize=self.norm_topk_prob)
        return MoEConfig(
            hidden_size=self.hidden_size, ffn_size=self.moe_ffn_size, num_experts=self.num_experts,
            top_k=self.top_k, activation=Activation.SWIGLU, router=router, shared_ffn_size=self.shared_ffn_size,
            shared_expert_gate=self.shared_expert_gate, extra={"architecture": self.architecture},
            hypermoe=self.hypermoe, backend=self.moe_backend,
        )
