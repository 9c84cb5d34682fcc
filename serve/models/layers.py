"""Decoder building blocks: RMSNorm, rotary embeddings, GQA self-attention.

Shape legend: T tokens (all sequences of a step, flattened), D hidden, H query heads, Hkv key/value heads,
Dh head dim. Attention itself (which keys a query sees, where K/V live) is delegated to an
:class:`StepAttention`: the paged cache when serving (:mod:`serve.models.attention`), a dense causal mask when
training.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from serve.models import cpu_ops
from serve.models.config import FULL_ATTENTION, AttentionWindow, DecoderConfig, QKNorm
from serve.models.masked_sdpa import sdpa, window_mask
from serve.models.rope import apply_rope_interleaved


class StepAttention(Protocol):
    """``attend(layer, q_THd, k_THkvd, v_THkvd, window, sinks_H) -> o_THd``: stores K/V as needed and attends (one
    step); each query sees the keys of its ``window`` (:class:`AttentionWindow`) up to itself, and ``sinks_H`` (None:
    none) adds a per-head logit to each softmax's denominator."""

    def attend(self, layer: int, q_THd: torch.Tensor, k_THd: torch.Tensor, v_THd: torch.Tensor,
               window: AttentionWindow = FULL_ATTENTION, sinks_H: torch.Tensor | None = None) -> torch.Tensor: ...


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, computed in fp32 (as ``transformers``)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == torch.float32 and cpu_ops.fused(x):  # one C call (within 1e-6, tested)
            return cpu_ops.rms_norm(x, self.weight, self.eps)
        # one op, bit-identical (tested)
        if x.dtype == self.weight.dtype == torch.float32 and not torch.is_grad_enabled():
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def apply_rope(x_THd: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor) -> torch.Tensor:
    """NeoX rotation of the first ``R`` (cos width) dims of each head; the rest pass (partial rotary)."""
    if cos_TD.shape[-1] < x_THd.shape[-1]:
        R = cos_TD.shape[-1]
        return torch.cat((apply_rope(x_THd[..., :R], cos_TD, sin_TD), x_THd[..., R:]), dim=-1)
    half = x_THd.shape[-1] // 2
    rotated = torch.cat((-x_THd[..., half:], x_THd[..., :half]), dim=-1)
    return x_THd * cos_TD[:, None, :] + rotated * sin_TD[:, None, :]


class Attention(nn.Module):
    """GQA self-attention with one fused ``qkv_proj`` (q rows, then k rows, then v rows)."""

    def __init__(self, config: DecoderConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.clip_qkv = config.clip_qkv
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.o_proj_bias)
        self.eps = config.rms_norm_eps
        self.window = config.window(layer)
        self.sinks = nn.Parameter(torch.zeros(config.num_heads)) if config.attention_sinks else None
        self.rope = None if layer in config.nope_layers else apply_rope_interleaved if config.rope_interleave \
            else apply_rope
        self.qk_norm = QKNorm.NONE if config.qk_norm is QKNorm.L2 and self.rope is None else config.qk_norm
        self.temperature = config.attn_temperature if self.rope is None else None
        # what cpu_ops.qk_norm_rope computes: per-head (or no) q/k norms, then apply_rope (NeoX halves over the
        # first cos_TD.shape[-1] dims); a layer with anything else between qkv_proj and attention takes torch
        self.fusable = self.qk_norm in (QKNorm.NONE, QKNorm.HEAD) and config.clip_qkv is None \
            and self.rope is apply_rope
        if config.qk_norm is QKNorm.HEAD:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        elif config.qk_norm is QKNorm.FULL:
            self.q_norm = RMSNorm(self.q_size, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.kv_size, config.rms_norm_eps)

    def forward(self, x_TD: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor, backend: StepAttention,
                positions_T: torch.Tensor | None = None) -> torch.Tensor:
        T = x_TD.shape[0]
        qkv = self.qkv_proj(x_TD)
        if self.fusable and cpu_ops.fused(qkv):  # per-head q/k norms and the rotation in one C call
            q_THd, k_THd = cpu_ops.qk_norm_rope(qkv, self.num_heads, self.num_kv_heads, self.head_dim,
                                                *self._head_norm_weights(), self.eps, cos_TD, sin_TD)
            v_THd = qkv[:, self.q_size + self.kv_size:].reshape(T, self.num_kv_heads, self.head_dim)
            o_THd = backend.attend(self.layer, q_THd, k_THd, v_THd, self.window, self.sinks)
            return self.o_proj(o_THd.reshape(T, self.q_size))
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm is QKNorm.FULL:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q_THd = q.reshape(T, self.num_heads, self.head_dim)
        k_THd = k.reshape(T, self.num_kv_heads, self.head_dim)
        v_THd = v.reshape(T, self.num_kv_heads, self.head_dim)
        if self.qk_norm is QKNorm.HEAD:
            q_THd, k_THd = self.q_norm(q_THd), self.k_norm(k_THd)
        if self.rope is not None:
            q_THd, k_THd = self.rope(q_THd, cos_TD, sin_TD), self.rope(k_THd, cos_TD, sin_TD)
        if self.qk_norm is QKNorm.L2:
            q_THd, k_THd = _l2_norm(q_THd, self.eps), _l2_norm(k_THd, self.eps)
        if self.temperature is not None:
            floor_scale, attn_scale = self.temperature
            scale_T = torch.log1p(torch.floor((positions_T.float() + 1.0) / floor_scale)) * attn_scale + 1.0
            q_THd = (q_THd * scale_T[:, None, None]).to(q_THd.dtype)
        o_THd = backend.attend(self.layer, q_THd, k_THd, v_THd, self.window, self.sinks)
        return self.o_proj(o_THd.reshape(T, self.q_size))

    def _head_norm_weights(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.qk_norm is QKNorm.HEAD:
            return self.q_norm.weight, self.k_norm.weight
        return None, None


def _l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS normalisation without a weight, in fp32 (``transformers``' ``Llama4TextL2Norm``)."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


class DenseCausalAttention:
    """Attention over ``B`` equal-length sequences laid out as ``T = B*S`` tokens (training, tests)."""

    def __init__(self, batch: int, seq_len: int) -> None:
        self.batch, self.seq_len = batch, seq_len

    def attend(self, layer: int, q_THd: torch.Tensor, k_THd: torch.Tensor, v_THd: torch.Tensor,
               window: AttentionWindow = FULL_ATTENTION, sinks_H: torch.Tensor | None = None) -> torch.Tensor:
        B, S = self.batch, self.seq_len
        q = q_THd.view(B, S, *q_THd.shape[1:]).transpose(1, 2)
        k = k_THd.view(B, S, *k_THd.shape[1:]).transpose(1, 2)
        v = v_THd.view(B, S, *v_THd.shape[1:]).transpose(1, 2)
        mask = None if window.full and sinks_H is None else window_mask(0, S, window, q.device)
        o = sdpa(q, k, v, mask, sinks_H)
        return o.transpose(1, 2).reshape(B * S, *q_THd.shape[1:])
