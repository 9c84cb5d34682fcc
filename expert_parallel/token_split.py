"""Expert parallelism when every rank holds the same batch (serving: rank 0 broadcasts each step's tokens and
every rank runs the attention on all of them).

``shard_moe`` assumes each rank brings its *own* tokens. With a replicated batch that would compute every
routed row ``W`` times; :class:`TokenSplitDispatcher` instead routes only this rank's share of the tokens
through the EP dispatcher and all-gathers the shares' outputs, so each routed row is computed once, and every
rank leaves the layer with the whole ``y_TD``. The router, shared expert and HyperMoE adapter stay replicated
(they run on all ``T`` tokens, so an ``on_routing`` observer on any rank sees the whole batch).

Each expert receives its rows share by share, i.e. in token order: the same rows in the same order as the
single-process layer, so the results match it.

Shape legend: T tokens (equal on every rank), W ranks, C = ceil(T / W) tokens per share, D hidden,
R rows received by this rank after dispatch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from all_to_all.comm import EPComm
from all_to_all.dispatcher import Dispatcher
from expert_parallel.shard import shard_moe
from moe.layer import MoE
from routing.router import Routing


@dataclass
class TokenSplitMeta:
    inner: Any  # the wrapped dispatcher's meta for this rank's share
    num_tokens: int  # T
    share: int  # C


class TokenSplitDispatcher:
    """``dispatch``: this rank's share ``[r*C, (r+1)*C)`` of the (replicated) tokens through ``inner``;
    ``combine``: ``inner.combine`` of the share, then one all-gather of the ``W`` shares -> ``y_TD`` (fp32).

    Example: ``T = 5``, ``W = 2`` -> ``C = 3``; rank 0 routes tokens 0-2, rank 1 tokens 3-4 (padded to 3 rows
    for the all-gather, trimmed after). A rank whose share is empty (``T < W``) still takes part.
    """

    def __init__(self, inner: Dispatcher, comm: EPComm) -> None:
        self.inner = inner
        self.comm = comm

    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor, TokenSplitMeta]:
        T = x_TD.shape[0]
        C = -(-T // self.comm.world_size)
        lo, hi = min(self.comm.rank * C, T), min((self.comm.rank + 1) * C, T)
        share = dataclasses.replace(routing, weights_TK=routing.weights_TK[lo:hi], ids_TK=routing.ids_TK[lo:hi],
                                    logits_TE=routing.logits_TE[lo:hi])
        x_RD, counts_L, meta = self.inner.dispatch(x_TD[lo:hi], share)
        return x_RD, counts_L, TokenSplitMeta(meta, T, C)

    def combine(self, y_RD: torch.Tensor, meta: TokenSplitMeta) -> torch.Tensor:
        y_share = self.inner.combine(y_RD, meta.inner)  # [hi - lo, D] fp32
        C, D = meta.share, y_share.shape[1]
        padded_CD = torch.zeros(C, D, dtype=y_share.dtype, device=y_share.device)
        padded_CD[: y_share.shape[0]] = y_share
        gathered = torch.empty(self.comm.world_size * C, D, dtype=y_share.dtype, device=y_share.device)
        self.comm.all_gather(gathered, padded_CD, label="token_split_gather")
        return gathered[: meta.num_tokens]


def shard_moe_token_split(module: nn.Module, group: dist.ProcessGroup | None = None, **shard_kwargs) -> nn.Module:
    """``shard_moe(module, group, **shard_kwargs)`` for a batch every rank holds in full: each MoE layer then
    routes this rank's share of the tokens and all-gathers the outputs. In place; returns ``module``.

    Every rank must call every forward with the same tokens (same ``T``).
    """
    shard_moe(module, group, **shard_kwargs)
    for layer in module.modules():
        if isinstance(layer, MoE):
            layer.dispatcher = TokenSplitDispatcher(layer.dispatcher, layer.dispatcher.comm)
    return module
