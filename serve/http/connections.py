"""What a connection may cost the server before it is a request: header and body deadlines, and an origin guard.

uvicorn's h11 protocol times out idle keep-alive connections only, so a client that sends its headers or body a
byte at a time holds a connection for as long as it likes (slowloris). :class:`TimedH11Protocol` gives each
request's headers ``server.header_timeout_s`` from its first byte (or from the connection's opening) and its body
``server.body_timeout_s`` from the end of its headers. A request whose headers are late gets a 408 in OpenAI's
error schema and the connection is closed (one that sent nothing is closed silently); a body that the handler is
reading gets its 408 from :class:`RequestGuard`, and one that nobody reads (the answer came first: a 401, 415, ...)
is cut ``_BODY_GRACE_S`` later.

:class:`RequestGuard` (ASGI middleware, outside CORS) refuses before anything reads the body: a browser request
from an origin that is neither the server's own nor in ``server.cors_allowed_origins`` (403), and a POST whose
``Content-Type`` is not ``application/json`` (415).
"""

from __future__ import annotations

import asyncio
import json
from urllib.parse import urlsplit

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from serve.http.protocol import ApiError

_BODY_GRACE_S = 1.0  # the handler's 408 comes first; the protocol cuts a body nobody reads this much later


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with header and body deadlines (uvicorn passes ``config``, ``server_state``,
    ``app_state``; bind the deadlines with ``functools.partial``)."""

    def __init__(self, *args, header_timeout_s: float, body_timeout_s: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s, self.body_timeout_s = header_timeout_s, body_timeout_s
        self._deadline: asyncio.TimerHandle | None = None
        self._phase: object | None = None  # the h11 state of theirs (IDLE: headers, SEND_BODY) it is for

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(h11.IDLE, self.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        state = self.conn.their_state
        if state is h11.IDLE:  # headers under way (a keep-alive connection's next request: from its first byte)
            self._arm(h11.IDLE, self.header_timeout_s)
        elif state is h11.SEND_BODY:
            self._arm(h11.SEND_BODY, self.body_timeout_s + _BODY_GRACE_S)
        else:  # the request is in (DONE), or the connection is done for
            self._disarm()

    def _arm(self, phase, timeout_s: float) -> None:
        if self._phase is phase or self.transport.is_closing():
            return
        self._disarm()
        self._phase = phase
        self._deadline = self.loop.call_later(timeout_s, self._expired, phase)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline, self._phase = None, None

    def _expired(self, phase) -> None:
        self._deadline, self._phase = None, None
        if self.transport.is_closing() or self.conn.their_state is not phase:
            return
        if phase is h11.IDLE and self.conn.trailing_data[0]:  # part of a request came: say why it is cut
            error = ApiError(408, f"request headers not received within server.header_timeout_s "
                                  f"({self.header_timeout_s:g} s)")
            self.transport.write(_raw_408(error))
        self.transport.close()


def _raw_408(error: ApiError) -> bytes:
    """A whole HTTP/1.1 408 for a request h11 never parsed (so h11 cannot write it)."""
    body = json.dumps(error.body()).encode()
    head = (f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode() + body


class RequestGuard:
    """ASGI middleware: 403 for a foreign browser origin, 415 for a POST body that is not JSON, and the handler's
    body reads bounded by ``body_timeout_s`` (a 408 that closes the connection)."""

    def __init__(self, app, allowed_origins: list[str], body_timeout_s: float) -> None:
        self.app, self.body_timeout_s = app, body_timeout_s
        self.any_origin = "*" in allowed_origins
        self.allowed = {o.rstrip("/").lower() for o in allowed_origins}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        error = self._refusal(scope["method"], headers)
        if error is not None:
            return await _send_error(send, error)
        await self.app(scope, self._bounded(receive), send)

    def _refusal(self, method: str, headers: dict[str, str]) -> ApiError | None:
        origin = headers.get("origin")
        if origin is not None and not self._allowed(origin, headers.get("host", "")):
            return ApiError(403, f"origin ({origin!r}) is not allowed: add it to server.cors_allowed_origins",
                            "Origin")
        if method == "POST":
            kind = headers.get("content-type", "").partition(";")[0].strip().lower()
            if kind != "application/json":
                return ApiError(415, f"Content-Type ({kind or 'missing'!r}) must be 'application/json'",
                                "Content-Type")
        return None

    def _allowed(self, origin: str, host: str) -> bool:
        if self.any_origin or origin.rstrip("/").lower() in self.allowed:
            return True
        return origin != "null" and urlsplit(origin).netloc.lower() == host.lower()  # same origin

    def _bounded(self, receive):
        loop = asyncio.get_running_loop()
        deadline, done = loop.time() + self.body_timeout_s, False

        async def bounded():
            nonlocal done
            if done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                raise ApiError(408, f"request body not received within server.body_timeout_s "
                                    f"({self.body_timeout_s:g} s)", headers={"Connection": "close"}) from None
            done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        return bounded


async def _send_error(send, error: ApiError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
