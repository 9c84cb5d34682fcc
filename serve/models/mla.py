"""Multi-head latent attention (DeepSeek-V2/V3, Kimi K2, GLM-4.7-Flash, Mistral 4): the layer, and the reference
math of attending through the latent, which every attention backend's MLA step follows.

Shape legend: T tokens of the step, D hidden, H heads, N = qk_nope_head_dim, R = qk_rope_head_dim,
V = v_head_dim, L = kv_lora_rank, C = L + R (one cached latent per token), S keys, B decoding sequences.

The layer projects each token to queries ``q_nope_THN``, ``q_pe_THR`` and one latent ``[c_kv_TL, k_pe_TR]``
(``kv_a_proj_with_mqa`` -> RMSNorm of the first L -> RoPE on the last R). Keys and values of head h are
``k_h = [W_UK_h c, k_pe]``, ``v_h = W_UV_h c``, with ``kv_b_proj.weight`` = ``[W_UK_0; W_UV_0; W_UK_1; ...]``.
Two equal ways to attend:

- **expanded** (prefill): build K and V of every head from the latents, ``softmax(q k^T * scale) v``;
- **absorbed** (decode): fold ``W_UK`` into the query, ``q_lat_h = [q_nope_h W_UK_h, q_pe_h]`` (C values), so
  ``q_h . k_h = q_lat_h . latent``: every head attends over the cached latents themselves (multi-query attention
  with one C-wide "head" for keys and its first L values for values), then ``o_h = W_UV_h o_lat_h``. The cache is
  read once for all heads, never expanded. (vLLM's ``MLACommonImpl`` and SGLang's MLA backends do the same.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from serve.models.config import DecoderConfig
from serve.models.layers import RMSNorm, apply_rope
from serve.models.rope import apply_rope_interleaved, yarn_mscale
from serve.models.sparse_attention import Indexer, IndexerQuery

LORA_NORM_EPS = 1e-6  # transformers' q_a_layernorm / kv_a_layernorm use the RMSNorm default, not rms_norm_eps


@dataclass
class MLAWeights:
    """What attending through the latent needs of a layer: ``kv_b_weight`` ``[H * (N + V), L]`` and its views
    ``w_uk_HNL``, ``w_uv_HVL``; ``scale`` multiplies the scores."""

    kv_b_weight: torch.Tensor
    w_uk_HNL: torch.Tensor
    w_uv_HVL: torch.Tensor
    scale: float

    @classmethod
    def of(cls, kv_b_weight: torch.Tensor, heads: int, nope: int, scale: float) -> MLAWeights:
        w_HXL = kv_b_weight.view(heads, -1, kv_b_weight.shape[-1])
        return cls(kv_b_weight, w_HXL[:, :nope], w_HXL[:, nope:], scale)

    @property
    def heads(self) -> int:
        return self.w_uk_HNL.shape[0]


class MLAStepAttention(Protocol):
    """``attend_latent(layer, q_nope_THN, q_pe_THR, latent_TC, weights, index) -> o_THV``: stores the step's
    latents as needed and attends (one step); the MLA counterpart of ``layers.StepAttention``. ``index``: DeepSeek
    Sparse Attention's indexer outputs (:mod:`serve.models.sparse_attention`), each query then attends to its
    selected keys only; backends that cannot refuse DSA models at construction (``sparse_mla``)."""

    def attend_latent(self, layer: int, q_nope_THN: torch.Tensor, q_pe_THR: torch.Tensor, latent_TC: torch.Tensor,
                      weights: MLAWeights, index: IndexerQuery | None = None) -> torch.Tensor: ...


def absorb_queries(q_nope_THN: torch.Tensor, q_pe_THR: torch.Tensor, w: MLAWeights) -> torch.Tensor:
    """``q_lat_THC = [q_nope_h @ W_UK_h, q_pe_h]`` per head."""
    q_lat_HTL = torch.bmm(q_nope_THN.transpose(0, 1), w.w_uk_HNL.to(q_nope_THN.dtype))
    return torch.cat([q_lat_HTL.transpose(0, 1), q_pe_THR], dim=-1)


def unabsorb_output(o_lat_THL: torch.Tensor, w: MLAWeights) -> torch.Tensor:
    """``o_THV``: ``o_h = W_UV_h @ o_lat_h`` per head."""
    o_HTV = torch.bmm(o_lat_THL.transpose(0, 1), w.w_uv_HVL.transpose(1, 2).to(o_lat_THL.dtype))
    return o_HTV.transpose(0, 1)


def latent_attention(q_lat_BHC: torch.Tensor, latent_BSC: torch.Tensor, kv_lora_rank: int, scale: float,
                     mask_B11S: torch.Tensor | None) -> torch.Tensor:
    """Absorbed attention over gathered latents: ``softmax(q_lat . latent * scale) @ latent[:, :L]`` ->
    ``o_lat_BHL`` (keys C wide, values their first L: one shared "kv head"). Two batched matmuls, every head of a
    sequence against its one latent matrix (SDPA with ``enable_gqa`` would copy the latents for each head)."""
    dtype = q_lat_BHC.dtype
    latent_BSC = latent_BSC.to(dtype)
    s_BHS = torch.baddbmm(mask_B11S[:, 0].to(dtype), q_lat_BHC, latent_BSC.transpose(1, 2), alpha=scale) \
        if mask_B11S is not None else torch.bmm(q_lat_BHC, latent_BSC.transpose(1, 2)).mul_(scale)
    return torch.bmm(torch.softmax(s_BHS, dim=-1), latent_BSC[..., :kv_lora_rank])


def expanded_attention(q_nope_THN: torch.Tensor, q_pe_THR: torch.Tensor, latent_SC: torch.Tensor, w: MLAWeights,
                       mask_TS: torch.Tensor | None) -> torch.Tensor:
    """Prefill by expanding K and V of every head from ``latent_SC`` (``transformers``' ``expand_kv``); causal
    when ``mask_TS`` is None. Returns ``o_THV``."""
    H, N = w.heads, w.w_uk_HNL.shape[1]
    L = w.kv_b_weight.shape[-1]
    latent_SC = latent_SC.to(q_nope_THN.dtype)
    kv_SHX = F.linear(latent_SC[:, :L], w.kv_b_weight.to(q_nope_THN.dtype)).view(latent_SC.shape[0], H, -1)
    k_nope_SHN, v_SHV = kv_SHX[..., :N], kv_SHX[..., N:]
    k_pe_SHR = latent_SC[:, None, L:].expand(-1, H, -1)
    q_HTK = torch.cat([q_nope_THN, q_pe_THR], dim=-1).transpose(0, 1)
    k_HSK = torch.cat([k_nope_SHN, k_pe_SHR], dim=-1).transpose(0, 1)
    o_HTV = F.scaled_dot_product_attention(q_HTK[None], k_HSK[None], v_SHV.transpose(0, 1)[None], attn_mask=mask_TS,
                                           is_causal=mask_TS is None, scale=w.scale)[0]
    return o_HTV.transpose(0, 1)


def expanded_decode(q_nope_BHN: torch.Tensor, q_pe_BHR: torch.Tensor, latent_BSC: torch.Tensor, w: MLAWeights,
                    mask_B11S: torch.Tensor) -> torch.Tensor:
    """Decode the naive way, as ``transformers`` does: K and V of every head expanded from all ``S`` gathered
    latents of each sequence at every step (``S x H x (N + V) x L`` MACs per sequence and layer, against the
    absorbed path's ``H x S x (C + L)``); SDPA over them. Returns ``o_BHV``. For the benchmark's comparison."""
    B, S, _ = latent_BSC.shape
    H, N = w.heads, w.w_uk_HNL.shape[1]
    L = w.kv_b_weight.shape[-1]
    dtype = q_nope_BHN.dtype
    latent_BSC = latent_BSC.to(dtype)
    kv_BSHX = F.linear(latent_BSC[..., :L], w.kv_b_weight.to(dtype)).view(B, S, H, -1)
    k_pe_BSHR = latent_BSC[:, :, None, L:].expand(-1, -1, H, -1)
    k_BHSK = torch.cat([kv_BSHX[..., :N], k_pe_BSHR], dim=-1).transpose(1, 2)
    q_BH1K = torch.cat([q_nope_BHN, q_pe_BHR], dim=-1)[:, :, None]
    o_BH1V = F.scaled_dot_product_attention(q_BH1K, k_BHSK, kv_BSHX[..., N:].transpose(1, 2),
                                            attn_mask=mask_B11S.to(dtype), scale=w.scale)
    return o_BH1V[:, :, 0]


class MLAAttention(nn.Module):
    """DeepSeek-V3's attention with ``transformers``' parameter names (``q_a_proj``/``q_a_layernorm``/``q_b_proj``
    or ``q_proj``, ``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``), and DeepSeek Sparse
    Attention's ``indexer`` (:class:`serve.models.sparse_attention.Indexer`) on the layers that run one."""

    def __init__(self, config: DecoderConfig, layer: int) -> None:
        super().__init__()
        mla = config.mla
        self.layer, self.mla = layer, mla
        self.num_heads = H = config.num_heads
        D, qk = config.hidden_size, mla.qk_nope_head_dim + mla.qk_rope_head_dim
        bias = config.attention_bias
        if mla.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, mla.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, LORA_NORM_EPS)
            self.q_b_proj = nn.Linear(mla.q_lora_rank, H * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, mla.latent_size, bias=bias)
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, LORA_NORM_EPS)
        self.kv_b_proj = nn.Linear(mla.kv_lora_rank, H * (mla.qk_nope_head_dim + mla.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * mla.v_head_dim, D, bias=bias)
        self.indexer = Indexer(config) if mla.has_indexer(layer) else None

    def forward(self, x_TD: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor, backend: MLAStepAttention,
                positions_T: torch.Tensor) -> torch.Tensor:
        mla, T, H = self.mla, x_TD.shape[0], self.num_heads
        # 1. queries, split into the part without position and the roped part
        if mla.q_lora_rank is None:
            q = self.q_proj(x_TD)
        else:
            q_resid_TQ = self.q_a_layernorm(self.q_a_proj(x_TD))
            q = self.q_b_proj(q_resid_TQ)
        q_nope_THN, q_pe_THR = q.view(T, H, -1).split([mla.qk_nope_head_dim, mla.qk_rope_head_dim], dim=-1)
        # 2. the token's latent: normalised c_kv, then the roped key part shared by all heads
        c_TL, k_pe_TR = self.kv_a_proj_with_mqa(x_TD).split([mla.kv_lora_rank, mla.qk_rope_head_dim], dim=-1)
        rope = apply_rope_interleaved if mla.rope_interleave else apply_rope
        q_pe_THR, k_pe_T1R = rope(q_pe_THR, cos_TR, sin_TR), rope(k_pe_TR[:, None], cos_TR, sin_TR)
        if mla.llama4_scaling_beta is not None:  # Mistral 4: the whole query scales with its position
            q_scale_T11 = 1 + mla.llama4_scaling_beta * torch.log(
                1 + torch.floor(positions_T / mla.llama4_max_positions))[:, None, None]
            q_nope_THN, q_pe_THR = q_nope_THN * q_scale_T11.to(q.dtype), q_pe_THR * q_scale_T11.to(q.dtype)
        latent_TC = torch.cat([self.kv_a_layernorm(c_TL), k_pe_T1R[:, 0]], dim=-1)
        # 3. DeepSeek Sparse Attention: the indexer's queries and key (a shared layer reuses the last selection)
        index = None
        if self.indexer is not None:
            index = self.indexer(x_TD, q_resid_TQ, cos_TR, sin_TR)
        elif mla.indexer is not None:
            index = IndexerQuery.shared(mla.indexer.topk)
        # 4. attention through the latent cache, then the output projection
        weights = MLAWeights.of(self.kv_b_proj.weight, H, mla.qk_nope_head_dim, mla.softmax_scale)
        o_THV = backend.attend_latent(self.layer, q_nope_THN.contiguous(), q_pe_THR, latent_TC, weights, index)
        return self.o_proj(o_THV.reshape(T, H * mla.v_head_dim))


class DenseCausalMLA:
    """MLA over ``B`` equal-length sequences laid out as ``T = B*S`` tokens, by expansion (training, tests)."""

    def __init__(self, batch: int, seq_len: int) -> None:
        self.batch, self.seq_len = batch, seq_len

    def attend_latent(self, layer: int, q_nope_THN: torch.Tensor, q_pe_THR: torch.Tensor, latent_TC: torch.Tensor,
                      weights: MLAWeights, index: IndexerQuery | None = None) -> torch.Tensor:
        if index is not None:
            raise NotImplementedError("DenseCausalMLA attends densely; DeepSeek Sparse Attention runs in the engine")
        S = self.seq_len
        return torch.cat([expanded_attention(q_nope_THN[b * S:(b + 1) * S], q_pe_THR[b * S:(b + 1) * S],
                                             latent_TC[b * S:(b + 1) * S], weights, None)
                          for b in range(self.batch)])


def deepseek_softmax_scale(qk_head_dim: int, yarn_factor: float | None, mscale_all_dim: float | None) -> float:
    """``qk_head_dim ** -0.5``, times ``yarn_mscale(factor, mscale_all_dim) ** 2`` under YaRN with
    ``mscale_all_dim`` (``transformers``' ``yarn_apply_mscale``)."""
    scale = qk_head_dim**-0.5
    if yarn_factor is not None and mscale_all_dim:
        m = yarn_mscale(yarn_factor, mscale_all_dim)
        scale = scale * m * m
    return scale
