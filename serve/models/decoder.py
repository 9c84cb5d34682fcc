"""``MoEDecoder``: a causal LM of GQA (or multi-head latent) attention + ``moe.MoE`` (or dense SwiGLU) blocks.

Shape legend: T tokens of one step (all sequences flattened), D hidden, V vocabulary, B sequences.
"""

from __future__ import annotations

import torch
from torch import nn

from hypermoe import HyperMoELayer, share_hypernetwork
from moe import MoE
from moe.config import Activation
from moe.shared import SharedExpert
from serve.models.config import DecoderConfig
from serve.models.layers import Attention, RMSNorm, StepAttention
from serve.models.mla import MLAAttention, MLAStepAttention
from serve.models.rope import rope_tables


class DecoderLayer(nn.Module):
    def __init__(self, config: DecoderConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn: nn.Module = Attention(config, layer) if config.mla is None else MLAAttention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.is_moe_layer(layer):
            self.mlp: nn.Module = MoE(config.moe_config())
        else:
            self.mlp = SharedExpert(config.hidden_size, config.dense_ffn_size, Activation.SWIGLU, False)

    def forward(self, x_TD: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor,
                backend: StepAttention | MLAStepAttention, positions_T: torch.Tensor) -> torch.Tensor:
        h_TD = self.input_layernorm(x_TD)
        x_TD = x_TD + self.self_attn(h_TD, cos_TD, sin_TD, backend, positions_T)
        return x_TD + self.mlp(self.post_attention_layernorm(x_TD))


class MoEDecoder(nn.Module):
    """``forward(input_ids_T, positions_T, backend) -> hidden_TD``; ``logits(hidden_TD) -> logits_TV`` (fp32)."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        if config.hypermoe is not None:  # one hypernetwork for all layers, as in the paper
            share_hypernetwork(self)
        self.init_buffers()

    def init_buffers(self) -> None:
        """(Re)compute the non-persistent buffers (RoPE tables, HyperMoE's set ranks); call after materialising
        a model built on the meta device."""
        for module in self.modules():
            if isinstance(module, HyperMoELayer):
                module.init_buffers()
        c = self.config  # head_dim: the rotary dims (MLA's qk_rope_head_dim)
        with torch.device("cpu"):  # also under a meta build: meta arithmetic's first use imports torch._dynamo (2 s)
            cos, sin = rope_tables(c.rotary_dim or c.head_dim, c.rope_theta, c.max_position_embeddings, c.yarn,
                                   c.rope_scaling)
        device = self.embed_tokens.weight.device
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)

    def forward(self, input_ids_T: torch.Tensor, positions_T: torch.Tensor,
                backend: StepAttention | MLAStepAttention) -> torch.Tensor:
        x_TD = self.embed_tokens(input_ids_T)
        cos_TD = self.rope_cos[positions_T].to(x_TD.dtype)
        sin_TD = self.rope_sin[positions_T].to(x_TD.dtype)
        for layer in self.layers:
            x_TD = layer(x_TD, cos_TD, sin_TD, backend, positions_T)
        return self.norm(x_TD)

    def logits(self, hidden_TD: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_TD).float()
