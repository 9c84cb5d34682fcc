"""DeepSeek Sparse Attention (DeepSeek-V3.2, GLM-5): the lightning indexer, and the reference math of choosing the
cached tokens each query attends to, which the torch MLA step follows.

Shape legend as :mod:`serve.models.mla` (T tokens, D hidden, R = qk_rope_head_dim), plus I indexer heads, J =
index_head_dim, S keys, K = min(index_topk, S) selected keys, X any leading batch dims.

Each token gets one indexer key ``k_TJ`` (``k_norm(wk(x))``, its first R dims roped), cached next to its latent
(:class:`serve.models.latent_cache.LatentKVCache`), and each query I indexer queries ``q_TIJ`` (``wq_b`` of the
query LoRA latent, roped the same way). The score of key s for query t is ``sum_i w_ti relu(q_ti . k_s / sqrt(J))``
with ``w_TI = weights_proj(x) / sqrt(I)`` (fp32); the query attends, by MLA, only to its ``index_topk``
best-scored keys among those causality allows (all of them while it has no more). This is ``transformers``'
``DeepseekV32Indexer`` (its fp32 casts, scaling before the relu, the RoPE layout: half-split for DeepSeek-V3.2,
interleaved for GLM-5), without DeepSeek's Hadamard rotation and FP8 scoring, which leave the scores unchanged
up to rounding.

Worked example (``index_topk`` 2): keys 0..3 scored ``[0.5, 2.0, -1.0, 1.0]`` for the query at position 3 ->
keys ``{1, 3}``; for the query at position 1 (keys 0, 1 allowed) -> ``{0, 1}``, everything it may see.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from serve.models.config import DecoderConfig
from serve.models.layers import apply_rope
from serve.models.rope import apply_rope_interleaved

INDEXER_NORM_EPS = 1e-6  # transformers' k_norm: nn.LayerNorm(index_head_dim, eps=1e-6)
SCORE_BUDGET = 1 << 26  # fp32 values of [rows, I, S] scores a prefill chunk materialises at once (256 MiB)


@dataclass
class IndexerQuery:
    """One layer's indexer outputs for the step: ``q_TIJ`` (roped), ``k_TJ`` (to cache), ``w_TI`` (fp32 head
    weights, ``1/sqrt(I)`` included), ``scale`` (``1/sqrt(J)``) and ``topk``. ``q_TIJ`` None: a GLM-5 "shared"
    layer, which reuses the selection of the last layer that ran its indexer."""

    q_TIJ: torch.Tensor | None
    k_TJ: torch.Tensor | None
    w_TI: torch.Tensor | None
    scale: float
    topk: int

    @classmethod
    def shared(cls, topk: int) -> IndexerQuery:
        return cls(None, None, None, 1.0, topk)

    def rows(self, rows: slice) -> IndexerQuery:
        """The queries of one decode group or prefill chunk of the step."""
        if self.q_TIJ is None or self.w_TI is None:
            return self
        return IndexerQuery(self.q_TIJ[rows], None, self.w_TI[rows], self.scale, self.topk)


class Indexer(nn.Module):
    """The lightning indexer with ``transformers``' parameter names (``wq_b``, ``wk``, ``k_norm``,
    ``weights_proj``); ``weights_proj`` stays fp32 whatever the serving dtype, as ``transformers`` keeps it."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        mla = config.mla
        assert mla is not None and mla.indexer is not None and mla.q_lora_rank is not None
        self.spec, self.rope_dim = mla.indexer, mla.qk_rope_head_dim
        I, J = mla.indexer.num_heads, mla.indexer.head_dim
        self.wq_b = nn.Linear(mla.q_lora_rank, I * J, bias=False)
        self.wk = nn.Linear(config.hidden_size, J, bias=False)
        self.k_norm = nn.LayerNorm(J, eps=INDEXER_NORM_EPS)
        self.weights_proj = nn.Linear(config.hidden_size, I, bias=False)

    def forward(self, x_TD: torch.Tensor, q_resid_TQ: torch.Tensor, cos_TR: torch.Tensor,
                sin_TR: torch.Tensor) -> IndexerQuery:
        T, R = x_TD.shape[0], self.rope_dim
        I, J = self.spec.num_heads, self.spec.head_dim
        rope = apply_rope_interleaved if self.spec.rope_interleave else apply_rope
        q_TIJ = self.wq_b(q_resid_TQ).view(T, I, J)
        k_T1J = self.k_norm(self.wk(x_TD))[:, None]
        # the roped part comes first here (MLA's queries put it last)
        q_TIJ = torch.cat([rope(q_TIJ[..., :R], cos_TR, sin_TR), q_TIJ[..., R:]], dim=-1)
        k_TJ = torch.cat([rope(k_T1J[..., :R], cos_TR, sin_TR), k_T1J[..., R:]], dim=-1)[:, 0]
        w_TI = self.weights_proj(x_TD.to(self.weights_proj.weight.dtype)).float() * I**-0.5
        return IndexerQuery(q_TIJ, k_TJ, w_TI, J**-0.5, self.spec.topk)


def index_scores(q_XIJ: torch.Tensor, k_XSJ: torch.Tensor, w_XI: torch.Tensor, scale: float) -> torch.Tensor:
    """``s_XS = w_XI @ relu(q_XIJ @ k^T * scale)`` in fp32; ``k_XSJ`` may have fewer leading dims (shared keys of
    a prefill chunk's queries: ``[S, J]``)."""
    scores_XIS = torch.matmul(q_XIJ.float(), k_XSJ.float().transpose(-1, -2)) * scale
    return torch.matmul(w_XI[..., None, :], F.relu(scores_XIS))[..., 0, :]


def top_keys(scores_XS: torch.Tensor, allowed_XS: torch.Tensor, topk: int) -> torch.Tensor:
    """``keys_XK``: the ``K = min(topk, S)`` best-scored keys of each row among the allowed ones (``torch.topk``,
    as ``transformers``); a row with fewer than K allowed keys gets all of them, and disallowed ones after."""
    return scores_XS.masked_fill(~allowed_XS, float("-inf")).topk(min(topk, scores_XS.shape[-1]), dim=-1).indices


def prefill_selection(index: IndexerQuery, keys_SJ: torch.Tensor, causal_TS: torch.Tensor) -> torch.Tensor:
    """``keep_TS``: the keys each of a prefill chunk's queries attends to (its causal top-k), scored in blocks of
    rows that keep ``[rows, I, S]`` within :data:`SCORE_BUDGET`."""
    assert index.q_TIJ is not None and index.w_TI is not None
    T, I = index.q_TIJ.shape[:2]
    S = keys_SJ.shape[0]
    rows = max(1, SCORE_BUDGET // (I * S))
    keep_TS = torch.zeros_like(causal_TS)
    for a in range(0, T, rows):
        scores_tS = index_scores(index.q_TIJ[a:a + rows], keys_SJ, index.w_TI[a:a + rows], index.scale)
        keep_TS[a:a + rows].scatter_(1, top_keys(scores_tS, causal_TS[a:a + rows], index.topk), True)
    return keep_TS & causal_TS


def decode_selection(index: IndexerQuery, keys_BSJ: torch.Tensor, valid_BS: torch.Tensor) -> torch.Tensor:
    """``keys_BK``: the slots of its gathered keys each decoding query attends to (its top-k of the valid ones;
    rows with fewer than K valid keys also get padding slots, which the caller masks)."""
    assert index.q_TIJ is not None and index.w_TI is not None
    return top_keys(index_scores(index.q_TIJ, keys_BSJ, index.w_TI, index.scale), valid_BS, index.topk)
