"""``ServerConfig``: the HTTP server's options (Hydra group ``server``; ``server.port=``, ``server.host=``)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ServerConfig:
    """``served_model_name``: the name clients pass as ``model`` (default: the checkpoint directory's name, or
    ``moe-serve-default`` for the embedded model). ``drain_timeout_s``: on SIGTERM, in-flight requests get this
    long to finish before they are aborted. ``stall_s``: ``/health`` turns 503 when one engine step runs longer.
    ``max_expert_series``: cap on ``/metrics`` expert-load series (experts are bucketed above it).
    ``max_sub_requests_per_request``: cap on prompts x ``n`` of one request (a 400 above it).
    ``api_key``: when set (or, when unset, the ``MOE_SERVE_API_KEY`` environment variable), every endpoint but
    ``/health`` and ``/metrics`` needs ``Authorization: Bearer <key>`` (401 otherwise).
    ``drain_timeout_s`` (20) plus uvicorn's 5 s for the last frames fits Kubernetes' default 30 s grace period.
    ``header_timeout_s`` / ``body_timeout_s``: a request's headers must arrive this long after its first byte, its
    body this long after its headers (else a 408 and the connection is closed: :mod:`serve.http.connections`).
    ``limit_concurrency``: connections plus running requests above it get uvicorn's plain 503 (None: no bound).
    ``engine_process``: ``moe-serve`` runs the engine in a process of its own (the engine core: scheduling, the
    model, sampling) and keeps HTTP, tokenization and detokenization in this one, so the two use two cores and do
    not share a GIL; false: the engine steps on a thread of this process. A rank of a multi-process job always
    runs its engine in its own process.
    ``cors_allowed_origins``: browser origins (``https://app.example``, or ``*``) given CORS headers; a request
    whose ``Origin`` is neither one of them nor the server's own is a 403 (empty: no CORS, browsers same-origin).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    max_request_bytes: int = 16 * 2**20
    drain_timeout_s: float = 20.0
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    limit_concurrency: int | None = 1024
    cors_allowed_origins: list[str] = field(default_factory=list)
    stall_s: float = 120.0
    routing_stats: bool = True
    engine_process: bool = True
    routing_window: int = 100
    max_expert_series: int = 2048
    max_sub_requests_per_request: int = 256
    api_key: str | None = None
    log_level: str = "info"

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"server.port ({self.port!r}) must be an integer in [0, 65535]")
        for name in ("max_request_bytes", "routing_window", "max_expert_series", "max_sub_requests_per_request"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"server.{name} ({value!r}) must be a positive integer")
        for name in ("drain_timeout_s", "stall_s", "header_timeout_s", "body_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"server.{name} ({getattr(self, name)!r}) must be > 0")
        if self.limit_concurrency is not None and (not isinstance(self.limit_concurrency, int)
                                                   or self.limit_concurrency < 1):
            raise ValueError(f"server.limit_concurrency ({self.limit_concurrency!r}) must be a positive integer or "
                             "None")
        for origin in self.cors_allowed_origins:
            if origin != "*" and not (isinstance(origin, str) and origin.startswith(("http://", "https://"))):
                raise ValueError(f"server.cors_allowed_origins ({origin!r}) must be '*' or start with http:// or "
                                 "https:// (an origin: scheme://host[:port])")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()):
            raise ValueError("server.api_key (empty) must be a non-empty string or unset")
        levels = ("critical", "error", "warning", "info", "debug", "trace")
        if self.log_level not in levels:
            raise ValueError(f"server.log_level ({self.log_level!r}) is not one of: {', '.join(levels)}")
