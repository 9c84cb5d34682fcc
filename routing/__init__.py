"""Routers (softmax/sigmoid, correction bias, grouped top-k) and routing statistics: the ground floor, which
imports nothing of ours but ``moe.fields``.

The tools that read the statistics sit where their imports point down: ``expert_parallel.imbalance``
(metrics, EP placement loads, EPLB advice) and ``serve.launch.report`` (the ``moe-report`` CLI).
"""

from routing.config import GroupScore, RouterConfig, Scoring
from routing.router import Router, Routing, route
from routing.stats import RoutingStats

__all__ = ["GroupScore", "Router", "RouterConfig", "Routing", "RoutingStats", "Scoring", "route"]
