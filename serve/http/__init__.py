"""The OpenAI-compatible HTTP server over an engine: FastAPI app, engine loop, protocol, OpenAI formatting,
Prometheus metrics; :func:`run_server` serves a given engine."""

from serve.http.config import ServerConfig
from serve.http.server import run_server

__all__ = ["ServerConfig", "run_server"]
