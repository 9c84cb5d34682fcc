"""``DecoderConfig``: the decoder's shape and per-family switches, read from a Hugging Face ``config.json``."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from hypermoe import HyperMoEConfig
from moe.config import Activation, Backend, MoEConfig
from routing.config import RouterConfig, Scoring


@dataclass
class IndexerConfig:
    """DeepSeek Sparse Attention's lightning indexer (:mod:`serve.models.sparse_attention`), in ``config.json``'s
    names: each query attends to its ``index_topk`` best keys as scored by ``index_n_heads`` heads of
    ``index_head_dim`` (the first ``qk_rope_head_dim`` roped: interleaved pairs for GLM-5, halves for DeepSeek-V3.2).
    ``shared_layers``: GLM-5's "shared" layers, which have no indexer and reuse the last full layer's choice."""

    topk: int
    num_heads: int
    head_dim: int
    rope_interleave: bool = False
    shared_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name, value in (("index_topk", self.topk), ("index_n_heads", self.num_heads),
                            ("index_head_dim", self.head_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} ({value!r}) must be a positive integer")
        self.shared_layers = tuple(sorted(set(self.shared_layers)))
        if 0 in self.shared_layers:
            raise ValueError("indexer_types[0] ('shared') must be 'full': a shared layer reuses an earlier layer's "
                             "top-k")


@dataclass
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3): queries through an optional LoRA (``q_lora_rank``; None: one
    ``q_proj``), keys and values from one shared latent of ``kv_lora_rank`` plus a roped key part of
    ``qk_rope_head_dim`` shared by all heads. ``softmax_scale`` multiplies the scores (``qk_head_dim ** -0.5``
    times DeepSeek's YaRN ``mscale ** 2``); ``rope_interleave``: RoPE on interleaved pairs (``transformers``'
    ``apply_rotary_pos_emb_interleave``). ``llama4_scaling_beta`` (Mistral 4): queries at position p scale by
    ``1 + beta * log(1 + p // llama4_max_positions)``. ``indexer``: DeepSeek Sparse Attention (None: dense)."""

    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    softmax_scale: float
    q_lora_rank: int | None = None
    rope_interleave: bool = True
    llama4_scaling_beta: float | None = None
    llama4_max_positions: int = 1
    indexer: IndexerConfig | None = None

    def __post_init__(self) -> None:
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} ({value!r}) must be a positive integer")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank < 1):
            raise ValueError(f"q_lora_rank ({self.q_lora_rank!r}) must be a positive integer or None")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim ({self.qk_rope_head_dim}) must be even for RoPE")
        if self.indexer is not None:
            if self.q_lora_rank is None:
                raise ValueError("q_lora_rank (None): DeepSeek Sparse Attention's indexer reads the query LoRA "
                                 "latent; it needs a q_lora_rank")
            if self.indexer.head_dim < self.qk_rope_head_dim:
                raise ValueError(f"index_head_dim ({self.indexer.head_dim}) must be >= qk_rope_head_dim "
                                 f"({self.qk_rope_head_dim}), the indexer's roped part")

    @property
    def latent_size(self) -> int:
        """Values cached per token per layer: the normalised latent, then the roped key part."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def has_indexer(self, layer: int) -> bool:
        """Whether ``layer`` runs a lightning indexer (DSA, and not one of GLM-5's shared layers)."""
        return self.indexer is not None and layer not in self.indexer.shared_layers


@dataclass
class RopeScaling:
    """Linear (``inv_freq / factor``) or Llama 3 (low frequencies / factor, high kept, a smooth band between)
    RoPE scaling, as ``transformers``' ``_compute_linear_scaling_rope_parameters`` / ``_compute_llama3_parameters``."""

    kind: str  # "linear" | "llama3"
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "llama3"):
            raise ValueError(f"rope_parameters.rope_type ({self.kind!r}) must be 'linear' or 'llama3' here")
        if self.factor <= 0:
            raise ValueError(f"rope_parameters.factor ({self.factor!r}) must be > 0")
        if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor > 0:
            raise ValueError(f"rope_parameters high_freq_factor ({self.high_freq_factor}) must exceed "
                             f"low_freq_factor ({self.low_freq_factor}) > 0")


@dataclass
class YarnRope:
    """YaRN RoPE scaling as ``transformers``' ``_compute_yarn_parameters`` reads ``rope_parameters``;
    ``attention_factor`` scales cos and sin (None: from ``factor``, ``mscale`` and ``mscale_all_dim``)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        if not self.factor or self.factor <= 0:
            raise ValueError(f"rope_parameters.factor ({self.factor!r}) must be > 0")


@dataclass(frozen=True)
class AttentionWindow:
    """The cached keys a query at position ``p`` attends to: all of ``0..p`` (neither field set), the last
    ``sliding`` of them (``p - sliding < key <= p``, ``transformers``' ``sliding_window_overlay``), or those of its
    own ``chunk`` (``key // chunk == p // chunk``, Llama 4's chunked local attention). Always one contiguous range
    ``first_key(p) .. p``, which is what the attention kernels take."""

    sliding: int = 0
    chunk: int = 0

    def __post_init__(self) -> None:
        for name in ("sliding", "chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"attention window {name} ({value!r}) must be a non-negative integer")
        if self.sliding and self.chunk:
            raise ValueError(f"attention window: sliding ({self.sliding}) and chunk ({self.chunk}) are exclusive")

    @property
    def full(self) -> bool:
        return not (self.sliding or self.chunk)

    def first_key(self, pos):
        """The first key position ``pos`` sees (``pos`` an int or an integer tensor)."""
        if self.sliding:
            first = pos - self.sliding + 1
            return first.clamp(min=0) if isinstance(first, torch.Tensor) else max(first, 0)
        if self.chunk:
            return pos // self.chunk * self.chunk
        return pos * 0


FULL_ATTENTION = AttentionWindow()


class QKNorm(str, enum.Enum):
    """RMSNorm on queries and keys before RoPE."""

    NONE = "none"
    HEAD = "head"  # per head, over head_dim (Qwen3-MoE)
    FULL = "full"  # over all heads at once, weights [H*Dh] and [Hkv*Dh] (OLMoE)
    L2 = "l2"  # per head, no weights, *after* RoPE, on roped layers only (Llama 4's use_qk_norm)


@dataclass
class DecoderConfig:
    """A GQA decoder with RoPE, RMSNorm and MoE (or dense SwiGLU) feed-forward blocks.

    ``dense_layers`` lists the layers whose feed-forward is a dense SwiGLU MLP of ``dense_ffn_size``
    (Qwen-MoE's ``mlp_only_layers`` / ``decoder_sparse_step``, DeepSeek's ``first_k_dense_replace``); every other
    layer is an MoE block. ``mla``: multi-head latent attention instead of GQA (then ``head_dim`` is the RoPE
    part, ``qk_rope_head_dim``, and the KV cache holds one latent per token). The router: ``scoring``,
    ``correction_bias`` (DeepSeek-V3's ``e_score_correction_bias``), grouped top-k (``num_groups``,
    ``topk_groups``), ``routed_scaling_factor`` (see ``routing.RouterConfig``). ``num_mtp_layers``: DeepSeek's
    multi-token-prediction layers stored after the last layer; recognised, not served.
    ``attention_windows``: each layer's :class:`AttentionWindow` (empty: every layer full); ``attention_sinks``:
    a learned per-head logit joins each softmax's denominator (gpt-oss). ``activation``, ``expert_bias``,
    ``router_bias``, ``swiglu_alpha``/``swiglu_limit``: the routed experts' MLP (``moe.MoEConfig``'s fields);
    ``router_on_input``: the routing weight scales the expert input (Llama 4). ``rope_interleave``: RoPE on pairs
    ``(x0, x1), (x2, x3) ..`` instead of halves; ``nope_layers``: layers without RoPE; ``attn_temperature``:
    ``(floor_scale, attn_scale)`` of Llama 4's temperature tuning on those layers, queries at position p scaled
    by ``1 + attn_scale * log1p(floor((p + 1) / floor_scale))``.
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
    mla: MLAConfig | None = None
    yarn: YarnRope | None = None
    rope_scaling: RopeScaling | None = None  # linear or llama3 (YaRN: ``yarn``)
    scoring: Scoring = Scoring.SOFTMAX
    correction_bias: bool = False
    num_groups: int = 1
    topk_groups: int = 1
    routed_scaling_factor: float = 1.0
    num_mtp_layers: int = 0
    rotary_dim: int = 0  # the rotated leading dims of each head (partial rotary; 0: all of head_dim)
    attention_windows: tuple[AttentionWindow, ...] = ()
    attention_sinks: bool = False
    activation: Activation = Activation.SWIGLU
    expert_bias: bool = False
    router_bias: bool = False
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    router_on_input: bool = False
    rope_interleave: bool = False
    nope_layers: tuple[int, ...] = ()
    attn_temperature: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        self.qk_norm = QKNorm(self.qk_norm)
        self.scoring = Scoring(self.scoring)
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
        self.activation = Activation(self.activation)
        self.nope_layers = tuple(sorted(set(self.nope_layers)))
        if any(not 0 <= i < self.num_layers for i in self.nope_layers):
            raise ValueError(f"nope_layers ({self.nope_layers}) must lie in [0, {self.num_layers}) (no_rope_layers)")
        self.attention_windows = tuple(self.attention_windows) or (FULL_ATTENTION,) * self.num_layers
        if len(self.attention_windows) != self.num_layers:
            raise ValueError(f"attention_windows has {len(self.attention_windows)} entries for {self.num_layers} "
                             "layers (layer_types)")
        if self.mla is not None and not all(w.full for w in self.attention_windows):
            raise ValueError("attention windows (sliding_window, attention_chunk_size) are not served with MLA")
        if self.rotary_dim % 2 or not 0 <= self.rotary_dim <= self.head_dim:
            raise ValueError(f"rotary_dim ({self.rotary_dim}) must be even and at most head_dim ({self.head_dim}); "
                             "from partial_rotary_factor")

    def is_moe_layer(self, layer: int) -> bool:
        return layer not in self.dense_layers

    def window(self, layer: int) -> AttentionWindow:
        return self.attention_windows[layer]

    @property
    def longest_window(self) -> int | None:
        """The most keys any layer's query sees (None: some layer sees its whole context)."""
        if any(w.full for w in self.attention_windows):
            return None
        return max(w.sliding or w.chunk for w in self.attention_windows)

    def moe_config(self) -> MoEConfig:
        router = RouterConfig(self.num_experts, self.top_k, scoring=self.scoring, renormalize=self.norm_topk_prob,
                              correction_bias=self.correction_bias, num_groups=self.num_groups,
                              topk_groups=self.topk_groups, routed_scaling_factor=self.routed_scaling_factor,
                              bias=self.router_bias, apply_on_input=self.router_on_input)
        return MoEConfig(
            hidden_size=self.hidden_size, ffn_size=self.moe_ffn_size, num_experts=self.num_experts,
            top_k=self.top_k, activation=self.activation, router=router, shared_ffn_size=self.shared_ffn_size,
            shared_expert_gate=self.shared_expert_gate, extra={"architecture": self.architecture},
            hypermoe=self.hypermoe, backend=self.moe_backend, expert_bias=self.expert_bias,
            swiglu_alpha=self.swiglu_alpha, swiglu_limit=self.swiglu_limit,
        )
