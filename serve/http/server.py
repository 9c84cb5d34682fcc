"""``run_server``: the OpenAI-compatible server over a given engine, until a drained shutdown.

The engine is built by the caller (``serve.launch``, a test, an embedding application); this room only serves
it. SIGTERM/SIGINT drain: no new requests, in-flight ones get ``server.drain_timeout_s`` to finish and are then
aborted (their streams end cleanly), the engine thread stops, and ``run_server`` returns.
"""

from __future__ import annotations

import functools
import logging
import signal
import socket
from collections.abc import Callable

import uvicorn

from serve.engine import LLMEngine
from serve.engine.core_process import EngineCoreClient
from serve.http.app import OpenAIServer
from serve.http.config import ServerConfig
from serve.http.connections import TimedH11Protocol

log = logging.getLogger("moe-serve")

# uvicorn's wait for open connections after the drain (which already waited drain_timeout_s and aborted the
# rest, so the streams left only have to write their last frames): drain + this must fit a supervisor's grace
# period (Kubernetes: 30 s)
_CLOSE_S = 5


class _DrainingServer(uvicorn.Server):
    """uvicorn's graceful shutdown, told to the application first so it refuses new work and bounds the wait."""

    def __init__(self, config: uvicorn.Config, api: OpenAIServer) -> None:
        super().__init__(config)
        self.api = api

    async def shutdown(self, sockets=None) -> None:
        await self.api.drain()  # before super(): the socket stays open, so /health answers 503 meanwhile
        await super().shutdown(sockets)


def run_server(engine: LLMEngine | EngineCoreClient, config: ServerConfig, routing_stats=None,
               on_server: Callable[[uvicorn.Server], None] | None = None,
               listener: socket.socket | None = None) -> None:
    """Serve ``engine`` (in this process, or an engine core in its own) over HTTP; returns after a drained
    shutdown. ``routing_stats``: a ``routing.RoutingStats`` attached to its model, for ``/metrics`` and
    ``/v1/moe/routing``. ``on_server`` gets the server before it starts (setting its ``should_exit`` stops it).
    ``listener``: a socket already bound to ``config.host:config.port`` (the launcher binds it before the model
    loads, so a taken port fails first); None: uvicorn binds it."""
    api = OpenAIServer(engine, config, routing_stats)
    # h11 always (not httptools when installed): the header and body deadlines live in its protocol
    protocol = functools.partial(TimedH11Protocol, header_timeout_s=config.header_timeout_s,
                                 body_timeout_s=config.body_timeout_s)
    uv_config = uvicorn.Config(api.app, host=config.host, port=config.port, log_level=config.log_level,
                               timeout_graceful_shutdown=_CLOSE_S, access_log=False, http=protocol,
                               limit_concurrency=config.limit_concurrency)
    server = _DrainingServer(uv_config, api)
    if on_server is not None:
        on_server(server)
    port = listener.getsockname()[1] if listener is not None else config.port
    log.info("serving %s on http://%s:%d/v1", api.model_name, config.host, port)
    # uvicorn hands the signal it drained on back to the previous handler once it is done; the process default
    # for SIGTERM would then kill us (exit -15). A drained shutdown is a clean one: exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: log.info("drained; exiting"))
    try:
        server.run(sockets=[listener] if listener is not None else None)
    finally:
        if listener is not None:
            listener.close()
