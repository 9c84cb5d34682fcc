"""Routers (softmax/sigmoid, correction bias, grouped top-k) and routing statistics.

``routing.imbalance`` (metrics, EP placement loads, EPLB advice) and ``routing.report`` (the ``moe-report`` CLI)
are imported by name: they pull in ``expert_parallel`` and, when used, rich/matplotlib/wandb/serve.
"""

from routing.config import GroupScore, RouterConfig, Scoring
from routing.router import Router, Routing, route
from routing.stats import RoutingStats

__all__ = ["GroupScore", "Router", "RouterConfig", "Routing", "RoutingStats", "Scoring", "route"]
