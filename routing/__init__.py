"""Routers (softmax/sigmoid, correction bias, grouped top-k) and, later, routing statistics."""

from routing.config import GroupScore, RouterConfig, Scoring
from routing.router import Router, Routing, route

__all__ = ["GroupScore", "Router", "RouterConfig", "Routing", "Scoring", "route"]
