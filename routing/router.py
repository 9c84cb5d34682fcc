"""Token-choice routers: logits -> (weights, expert ids), routing math in fp32.

Shape legend: T tokens, D hidden size, E experts, K experts per token (top-k), G expert groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from routing.config import GroupScore, RouterConfig, Scoring


@dataclass
class Routing:
    """What a router decided for each token.

    ``weights_TK`` (fp32) and ``ids_TK`` (int32) list, per token, the chosen experts and their weights;
    ``logits_TE`` are the raw router logits (fp32). ``apply_on_input`` means the weight scales the expert
    input rather than its output (Llama 4).
    """

    weights_TK: torch.Tensor
    ids_TK: torch.Tensor
    logits_TE: torch.Tensor
    apply_on_input: bool = False


class Router(nn.Module):
    """``Router(config, hidden_size)(x_TD) -> Routing``.

    Parameters: ``weight`` ``[E, D]`` (HF's ``gate.weight`` layout), ``bias`` ``[E]`` when ``config.bias``,
    buffer ``correction_bias`` ``[E]`` (fp32) when ``config.correction_bias``.
    """

    def __init__(self, config: RouterConfig, hidden_size: int) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.num_experts, hidden_size))
        nn.init.normal_(self.weight, std=hidden_size**-0.5)
        self.bias = nn.Parameter(torch.zeros(config.num_experts)) if config.bias else None
        if config.correction_bias:
            self.register_buffer("correction_bias", torch.zeros(config.num_experts, dtype=torch.float32))
        else:
            self.correction_bias = None

    def forward(self, x_TD: torch.Tensor) -> Routing:
        bias = None if self.bias is None else self.bias.float()
        logits_TE = F.linear(x_TD.float(), self.weight.float(), bias)
        weights_TK, ids_TK = route(logits_TE, self.config, self.correction_bias)
        return Routing(weights_TK, ids_TK.to(torch.int32), logits_TE, self.config.apply_on_input)


def route(
    logits_TE: torch.Tensor, config: RouterConfig, correction_bias_E: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select ``config.top_k`` experts per token from fp32 logits; returns ``(weights_TK fp32, ids_TK int64)``."""
    k = config.top_k
    logits_TE = logits_TE.float()
    if config.scoring is Scoring.SOFTMAX_TOPK:
        top_logits_TK, ids_TK = torch.topk(logits_TE, k, dim=-1)
        return _finish(torch.softmax(top_logits_TK, dim=-1), config), ids_TK

    # Logits order the experts exactly as their scores do, without the ties of a saturated sigmoid (1.0) or
    # an underflowed softmax (0.0); only a bias or a top-2 group sum needs the scores themselves (unless the
    # family adds its bias to the logits: then the logits are what it selects on).
    select_on_logits = config.bias_on_logits or (correction_bias_E is None and (
        config.num_groups == 1 or config.group_score is GroupScore.MAX
    ))
    scores_TE = None
    if not (select_on_logits and config.renormalize):  # else the scores of all E experts are never read
        scores_TE = _scores(logits_TE, config.scoring)
    choice_TE = logits_TE if select_on_logits else _computed(scores_TE)
    if correction_bias_E is not None:
        choice_TE = choice_TE + correction_bias_E
    if config.num_groups > 1:
        choice_TE = _mask_to_best_groups(choice_TE, config)
    ids_TK = torch.topk(choice_TE, k, dim=-1).indices

    if config.renormalize:
        weights_TK = _renormalized(logits_TE.gather(1, ids_TK), config.scoring)
    else:
        weights_TK = _computed(scores_TE).gather(1, ids_TK)
    return _finish(weights_TK, config), ids_TK


def _scores(logits_TE: torch.Tensor, scoring: Scoring) -> torch.Tensor:
    """Every expert's score (softmax over the experts, or one independent score per expert)."""
    if scoring is Scoring.SOFTMAX:
        return torch.softmax(logits_TE, dim=-1)
    if scoring is Scoring.SQRT_SOFTPLUS:
        return F.softplus(logits_TE).sqrt()
    return torch.sigmoid(logits_TE)


def _renormalized(chosen_logits_TK: torch.Tensor, scoring: Scoring) -> torch.Tensor:
    """The k chosen experts' scores divided by their sum, from their logits."""
    if scoring is Scoring.SOFTMAX:
        return torch.softmax(chosen_logits_TK, dim=-1)
    if scoring is Scoring.SQRT_SOFTPLUS:  # + 1e-20 as DeepSeek-V4: scores that all underflow give 0, not 0/0
        scores_TK = F.softplus(chosen_logits_TK).sqrt()
        return scores_TK / (scores_TK.sum(dim=-1, keepdim=True) + 1e-20)
    # s_i / sum_j s_j for s = sigmoid(l), computed as a softmax of logsigmoid so that scores that
    # underflow to 0 (very negative logits) still give their true proportions instead of 0/0.
    return torch.softmax(F.logsigmoid(chosen_logits_TK), dim=-1)


def _computed(scores_TE: torch.Tensor | None) -> torch.Tensor:
    """The scores, which the branches that read them always computed."""
    assert scores_TE is not None
    return scores_TE


def _finish(weights_TK: torch.Tensor, config: RouterConfig) -> torch.Tensor:
    if config.routed_scaling_factor != 1.0:
        weights_TK = weights_TK * config.routed_scaling_factor
    return weights_TK


def _mask_to_best_groups(choice_TE: torch.Tensor, config: RouterConfig) -> torch.Tensor:
    """Keep only the experts of each token's ``topk_groups`` best groups; the rest become -inf."""
    T, E = choice_TE.shape
    G = config.num_groups
    grouped_TGX = choice_TE.view(T, G, E // G)
    if config.group_score is GroupScore.TOP2_SUM:
        group_scores_TG = grouped_TGX.topk(2, dim=-1).values.sum(dim=-1)
    else:
        group_scores_TG = grouped_TGX.amax(dim=-1)
    best_groups_TG = torch.topk(group_scores_TG, config.topk_groups, dim=-1).indices
    keep_TG = torch.zeros(T, G, dtype=torch.bool, device=choice_TE.device).scatter_(1, best_groups_TG, True)
    return grouped_TGX.masked_fill(~keep_TG.unsqueeze(-1), float("-inf")).view(T, E)
