"""Router configuration: the routers of the major open MoE families as one dataclass."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from moe.fields import enum_field


class Scoring(str, enum.Enum):
    """How router logits become expert scores."""

    SOFTMAX = "softmax"  # softmax over all experts, then top-k (Mixtral, Qwen-MoE, OLMoE, DeepSeek-V2)
    SIGMOID = "sigmoid"  # independent sigmoid per expert (DeepSeek-V3, Llama 4)
    SOFTMAX_TOPK = "softmax_topk"  # top-k on logits, softmax over the k chosen (gpt-oss)
    SQRT_SOFTPLUS = "sqrt_softplus"  # independent sqrt(softplus(logit)) per expert (DeepSeek-V4)


class GroupScore(str, enum.Enum):
    """How a group of experts is ranked in grouped top-k."""

    TOP2_SUM = "top2_sum"  # DeepSeek-V3: sum of the group's two best (bias-corrected) scores
    MAX = "max"  # DeepSeek-V2 "group_limited_greedy": the group's best score


@dataclass
class RouterConfig:
    """Routing math, all computed in fp32.

    - ``scoring``: see :class:`Scoring`.
    - ``renormalize``: divide the chosen k scores by their sum (``norm_topk_prob``).
    - ``correction_bias``: DeepSeek-V3's aux-loss-free ``e_score_correction_bias``; added to the scores
      *only to select* experts, never to the weights.
    - ``num_groups`` / ``topk_groups``: grouped top-k; only experts of the best ``topk_groups`` groups compete.
    - ``routed_scaling_factor``: multiplies the final weights.
    - ``apply_on_input``: the weight scales the expert *input* instead of its output (Llama 4).
    - ``bias``: the router linear layer has a bias (gpt-oss).
    - ``bias_on_logits``: the correction bias is added to the *logits*, not the scores, to select (Kolibri-1).
    """

    num_experts: int
    top_k: int
    scoring: Scoring = Scoring.SOFTMAX
    renormalize: bool = True
    correction_bias: bool = False
    num_groups: int = 1
    topk_groups: int = 1
    group_score: GroupScore = GroupScore.TOP2_SUM
    routed_scaling_factor: float = 1.0
    apply_on_input: bool = False
    bias: bool = False
    bias_on_logits: bool = False

    def __post_init__(self) -> None:
        self.scoring = enum_field(Scoring, "scoring", self.scoring)
        self.group_score = enum_field(GroupScore, "group_score", self.group_score)
        if self.num_experts < 1:
            raise ValueError(f"num_experts ({self.num_experts}) must be >= 1")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be between 1 and num_experts ({self.num_experts})")
        if self.num_groups < 1 or self.num_experts % self.num_groups:
            raise ValueError(
                f"num_groups ({self.num_groups}) must be >= 1 and divide num_experts ({self.num_experts})"
            )
        if not 1 <= self.topk_groups <= self.num_groups:
            raise ValueError(f"topk_groups ({self.topk_groups}) must be between 1 and num_groups ({self.num_groups})")
        experts_per_group = self.num_experts // self.num_groups
        if self.num_groups > 1 and self.top_k > self.topk_groups * experts_per_group:
            raise ValueError(
                f"top_k ({self.top_k}) exceeds the experts left by grouped top-k "
                f"(topk_groups {self.topk_groups} x {experts_per_group} experts per group)"
            )
        if self.num_groups > 1 and self.group_score is GroupScore.TOP2_SUM and experts_per_group < 2:
            raise ValueError(f"group_score top2_sum needs >= 2 experts per group, got {experts_per_group}")
        if self.bias_on_logits and not self.correction_bias:
            raise ValueError("bias_on_logits (True) needs a correction bias (correction_bias=True)")
        if self.routed_scaling_factor <= 0:
            raise ValueError(f"routed_scaling_factor ({self.routed_scaling_factor}) must be > 0")

