"""Scaled dot-product attention with what the plain op lacks: a window's key range and attention sinks.

The torch reference every attention path is tested against (the paged backends' torch path, the dense one of
training and tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from serve.models.config import AttentionWindow


def window_mask(num_cached: int, num_tokens: int, window: AttentionWindow, device: torch.device) -> torch.Tensor:
    """``[T, S]`` boolean, S = num_cached + T: query i (at position num_cached + i) sees the keys of its window up
    to itself."""
    keys_S = torch.arange(num_cached + num_tokens, device=device)
    pos_T = num_cached + torch.arange(num_tokens, device=device)
    mask_TS = keys_S[None, :] <= pos_T[:, None]
    if not window.full:
        mask_TS &= keys_S[None, :] >= window.first_key(pos_T)[:, None]
    return mask_TS


def sdpa(q_BHTd: torch.Tensor, k_BHkvSd: torch.Tensor, v_BHkvSd: torch.Tensor, mask: torch.Tensor | None,
         sinks_H: torch.Tensor | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with GQA (``mask``: boolean or additive, broadcast to the scores; None:
    causal). ``sinks_H``: gpt-oss's attention sinks, one logit per head in each softmax's denominator with no
    value, computed as ``transformers``' ``eager_attention_forward`` does (scores, concatenated sinks, softmax,
    sink column dropped)."""
    if sinks_H is None:
        return F.scaled_dot_product_attention(q_BHTd, k_BHkvSd, v_BHkvSd, attn_mask=mask, is_causal=mask is None,
                                              enable_gqa=True)
    G = q_BHTd.shape[1] // k_BHkvSd.shape[1]
    k, v = k_BHkvSd.repeat_interleave(G, dim=1), v_BHkvSd.repeat_interleave(G, dim=1)
    scores = torch.matmul(q_BHTd, k.transpose(-1, -2)) * q_BHTd.shape[-1] ** -0.5
    if mask is None:  # causal, the queries being the last T of the S keys
        T, S = scores.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=scores.device).tril(S - T)
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    else:
        scores = scores + mask
    sinks = sinks_H.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    logits = torch.cat([scores, sinks], dim=-1)
    probs = torch.softmax(logits - logits.amax(dim=-1, keepdim=True), dim=-1)[..., :-1]
    return torch.matmul(probs.to(v.dtype), v)
