"""The OpenAI-compatible HTTP API (FastAPI): ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``,
``/health``, ``/metrics`` and ``/v1/moe/routing``.

A request goes: body -> :mod:`serve.http.protocol` (4xx on anything malformed) -> prompts tokenized (in a worker
thread) and checked against the context -> one engine sub-request per prompt and choice (``n``), admitted
together by :class:`serve.http.engine_loop.EngineLoop` (429 + ``Retry-After`` when the queue is full) -> SSE
chunks or one JSON body. Whatever way the handler ends (done, client gone, shutdown), what is left of its
sub-requests is aborted, so their KV blocks come back within one engine step.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from serve.engine import LLMEngine
from serve.engine.sampling_params import SamplingParams
from serve.engine.scheduler import QueueFullError
from serve.http.config import ServerConfig
from serve.http.engine_loop import EngineDeadError, EngineLoop, RequestGroup, SubRequest
from serve.http.metrics import ServerMetrics
from serve.http.openai_format import ChoiceText, LogprobFormatter, usage
from serve.http.protocol import ApiError, ChatRequest, CompletionRequest, parse_body, validation_error


@dataclass
class Prepared:
    """A validated request, ready to submit: one entry per prompt, ``n`` choices each."""

    kind: str  # "completion" | "chat"
    request: CompletionRequest | ChatRequest
    prompt_ids: list[list[int]]
    prompt_texts: list[str]
    params: list[SamplingParams]  # per choice: prompt-major, then n
    logprobs: int | None
    arrival: float = field(default_factory=time.monotonic)

    @property
    def n(self) -> int:
        return self.request.n


class OpenAIServer:
    """The application state: engine loop, metrics, model name; ``app`` is the FastAPI application."""

    def __init__(self, engine: LLMEngine, config: ServerConfig, routing_stats=None) -> None:
        self.engine, self.config, self.routing_stats = engine, config, routing_stats
        self.tokenizer = engine.tokenizer
        self.model_name = config.served_model_name or _default_name(engine.config.model)
        self.metrics = ServerMetrics(self.model_name, routing_stats, config.max_expert_series)
        self.loop = EngineLoop(engine, self._on_step, config.stall_s)
        self.logprob_format = LogprobFormatter(self.tokenizer)
        self.draining = False
        self.created = int(time.time())
        self.app = self._build_app()

    def _on_step(self, engine: LLMEngine, outputs) -> None:
        self.metrics.on_step(engine, outputs)
        if self.routing_stats is not None:
            self.routing_stats.step()

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def begin_drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """Refuse new requests; abort what still runs after ``drain_timeout_s`` (it then ends cleanly)."""
        self.draining = True
        loop.call_later(self.config.drain_timeout_s, self.loop.abort_all)

    def _build_app(self) -> FastAPI:
        @asynccontextmanager
        async def lifespan(app: FastAPI):
            self.loop.start()
            try:
                yield
            finally:
                self.draining = True
                await asyncio.to_thread(self.loop.shutdown)

        app = FastAPI(title="moe-serve", lifespan=lifespan)
        app.add_exception_handler(ApiError, _api_error)
        app.add_exception_handler(RequestValidationError, lambda r, e: _api_error(r, validation_error(e.errors())))
        app.add_exception_handler(HTTPException, lambda r, e: _api_error(r, ApiError(e.status_code, str(e.detail))))
        app.get("/health")(self.health)
        app.get("/metrics")(self.prometheus)
        app.get("/v1/models")(self.models)
        app.get("/v1/moe/routing")(self.routing)
        app.post("/v1/completions")(self.completions)
        app.post("/v1/chat/completions")(self.chat_completions)
        return app

    # -- small endpoints ----------------------------------------------------------------------------------------
    async def health(self) -> Response:
        ok, reason = self.loop.health()
        if self.draining:
            ok, reason = False, "draining"
        return JSONResponse({"status": "ok" if ok else "unavailable", "reason": reason}, 200 if ok else 503)

    async def prometheus(self) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def models(self) -> dict:
        return {"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": self.created, "owned_by": "moe-serve",
            "max_model_len": self.engine.max_model_len}]}

    async def routing(self) -> dict:
        if self.routing_stats is None:
            raise ApiError(404, "routing statistics are off (server.routing_stats=false)")
        return await asyncio.to_thread(self.routing_stats.to_dict)

    # -- generation ---------------------------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        req = parse_body(await _read_body(request, self.config.max_request_bytes), CompletionRequest,
                         self.config.max_request_bytes)
        self._check_model(req.model)
        if req.echo and req.logprobs is not None:
            raise ApiError(400, "echo with logprobs (prompt logprobs) is not supported", "echo")
        texts_or_ids = [req.prompt] if isinstance(req.prompt, str) or _is_ids(req.prompt) else req.prompt
        if not texts_or_ids:
            raise ApiError(400, "prompt ([]) must not be empty", "prompt")
        prompts = [await self._tokenize(p) for p in texts_or_ids]
        prep = self._prepare("completion", req, prompts, req.max_tokens, req.logprobs)
        return await self._respond(prep, request)

    async def chat_completions(self, request: Request) -> Response:
        req = parse_body(await _read_body(request, self.config.max_request_bytes), ChatRequest,
                         self.config.max_request_bytes)
        self._check_model(req.model)
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, f"top_logprobs ({req.top_logprobs}) requires logprobs=true", "top_logprobs")
        if self.tokenizer is None or self.tokenizer.chat_template is None:
            raise ApiError(400, "messages: this model has no chat template; use /v1/completions", "messages")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            ids = await asyncio.to_thread(self.tokenizer.encode_chat, messages)
        except Exception as e:  # a template may raise anything (jinja's raise_exception, bad roles, ...)
            raise ApiError(400, f"messages: the chat template rejected them: {e}", "messages") from None
        max_tokens = req.max_completion_tokens or req.max_tokens
        prep = self._prepare("chat", req, [(ids, "")], max_tokens, (req.top_logprobs or 0) if req.logprobs else None)
        return await self._respond(prep, request)

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(404, f"model ({model!r}) does not exist; this server serves {self.model_name!r}", "model")

    async def _tokenize(self, prompt: str | list[int]) -> tuple[list[int], str]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ApiError(400, "prompt (str): this model has no tokenizer; send token ids", "prompt")
            if not prompt:
                raise ApiError(400, "prompt ('') must not be empty", "prompt")
            return await asyncio.to_thread(self.tokenizer.encode, prompt), prompt
        if not prompt:
            raise ApiError(400, "prompt ([]) must not be empty", "prompt")
        vocab = self.engine.model.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"prompt token ids ({bad[:5]}) must be in [0, {vocab})", "prompt")
        text = await asyncio.to_thread(self.tokenizer.decode, prompt) if self.tokenizer else ""
        return list(prompt), text

    def _prepare(self, kind, req, prompts, max_tokens: int | None, logprobs: int | None) -> Prepared:
        limit = self.engine.max_model_len
        params = []
        for ids, _ in prompts:
            if len(ids) >= limit:
                raise ApiError(400, f"prompt has {len(ids)} tokens; the context (max_model_len) is {limit} tokens, "
                               "which leaves no room for output", "prompt" if kind == "completion" else "messages")
            wanted = limit - len(ids) if max_tokens is None else max_tokens
            if len(ids) + wanted > limit:
                name = "max_tokens" if kind == "completion" or req.max_completion_tokens is None \
                    else "max_completion_tokens"
                raise ApiError(400, f"{name} ({wanted}) + prompt tokens ({len(ids)}) exceed the context "
                               f"(max_model_len) of {limit} tokens", name)
            for choice in range(req.n):
                params.append(self._sampling(req, wanted, logprobs, choice))
        return Prepared(kind, req, [ids for ids, _ in prompts], [t for _, t in prompts], params, logprobs)

    @staticmethod
    def _sampling(req, max_tokens: int, logprobs: int | None, choice: int) -> SamplingParams:
        seed = None if req.seed is None else (req.seed + choice) % 2**63  # n choices must differ
        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0,
                min_p=req.min_p or 0.0, seed=seed, stop=req.stop, ignore_eos=req.ignore_eos, logprobs=logprobs)
        except ValueError as e:
            raise ApiError.from_value_error(e) from None

    async def _respond(self, prep: Prepared, request: Request) -> Response:
        if self.draining:
            raise ApiError(503, "the server is shutting down", headers={"Retry-After": "5"})
        rid = ("chatcmpl-" if prep.kind == "chat" else "cmpl-") + uuid.uuid4().hex
        # choice j > 0 of a prompt waits for choice 0 to compute the prompt, then shares its blocks
        subs = [SubRequest(f"{rid}-{i}", prep.prompt_ids[i // prep.n], p, f"{rid}-{i - i % prep.n}" if i % prep.n
                           else None) for i, p in enumerate(prep.params)]
        try:
            group = await self.loop.submit(subs)
        except QueueFullError as e:
            self.metrics.rejected.labels("429").inc()
            raise ApiError(429, f"the server is busy: {e}", headers={"Retry-After": "1"}) from None
        except EngineDeadError as e:
            raise ApiError(503, str(e), headers={"Retry-After": "5"}) from None
        except ValueError as e:
            raise ApiError.from_value_error(e) from None
        for ids in prep.prompt_ids:
            self.metrics.prompt_tokens.inc(len(ids))
        run = _Run(self, prep, rid, group)
        if prep.request.stream:
            return StreamingResponse(run.sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await run.collect(request)


class _Run:
    """One admitted HTTP request: turns its group's outputs into SSE chunks or a single response body."""

    def __init__(self, server: OpenAIServer, prep: Prepared, rid: str, group: RequestGroup) -> None:
        self.server, self.prep, self.rid, self.group = server, prep, rid, group
        stops = prep.params[0].stop
        self.texts = [ChoiceText(server.tokenizer, prep.prompt_ids[i // prep.n], stops) for i in range(len(group.subs))]
        self.final: list = [None] * len(group.subs)
        self.logprobs_sent = [0] * len(group.subs)
        self.text_offset = [0] * len(group.subs)
        self.last_token_at = [None] * len(group.subs)
        self.first_token = True
        self.object = "chat.completion" if prep.kind == "chat" else "text_completion"

    async def _next(self):
        index, item = await self.group.queue.get()
        if isinstance(item, Exception):
            raise item
        now = time.monotonic()
        m = self.server.metrics
        if item.new_token_ids:
            if self.first_token:
                m.ttft.observe(now - self.prep.arrival)
                self.first_token = False
            elif self.last_token_at[index] is not None:
                m.itl.observe(now - self.last_token_at[index])
            self.last_token_at[index] = now
        if item.finished:
            self.final[index] = item
        return index, item

    def _done(self) -> bool:
        return all(f is not None for f in self.final)

    def _choice_logprobs(self, index: int, out) -> dict | None:
        if self.prep.logprobs is None or out.logprobs is None:
            return None
        entries = out.logprobs[self.logprobs_sent[index]:]
        self.logprobs_sent[index] = len(out.logprobs)
        fmt = self.server.logprob_format
        if self.prep.kind == "chat":
            return fmt.chat(entries, self.prep.logprobs)
        body = fmt.completion(entries, self.prep.logprobs, self.text_offset[index])
        if body["tokens"]:
            self.text_offset[index] = body["text_offset"][-1] + len(body["tokens"][-1])
        return body

    def _usage(self) -> dict:
        return usage([len(ids) for ids in self.prep.prompt_ids], self.final)

    def _finish(self) -> None:
        self.server.loop.abort(self.group)  # no-op for finished sub-requests
        if self._done():
            self.server.metrics.e2e.observe(time.monotonic() - self.prep.arrival)

    # -- non-streaming ------------------------------------------------------------------------------------------
    async def collect(self, request: Request) -> Response:
        gone = asyncio.ensure_future(_wait_disconnect(request))
        try:
            while not self._done():
                getter = asyncio.ensure_future(self._next())
                await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    return Response(status_code=499)  # client closed the connection; nobody reads this
                index, out = getter.result()
                self.texts[index].update(out)
        except EngineDeadError as e:
            raise ApiError(503, str(e)) from None
        finally:
            gone.cancel()
            self._finish()
        return JSONResponse(self._body())

    def _body(self) -> dict:
        choices = []
        for index, out in enumerate(self.final):
            text = self.texts[index].text
            if self.prep.kind == "chat":
                choice = {"index": index, "message": {"role": "assistant", "content": text},
                          "logprobs": self._choice_logprobs(index, out), "finish_reason": out.finish_reason}
            else:
                if self.prep.request.echo:
                    text = self.prep.prompt_texts[index // self.prep.n] + text
                choice = {"index": index, "text": text, "logprobs": self._choice_logprobs(index, out),
                          "finish_reason": out.finish_reason, "stop_reason": out.stop_reason}
            choices.append(choice)
        return {"id": self.rid, "object": self.object, "created": int(time.time()), "model": self.server.model_name,
                "choices": choices, "usage": self._usage()}

    # -- streaming ----------------------------------------------------------------------------------------------
    def _chunk(self, choices: list[dict], usage_body: dict | None = None) -> str:
        body = {"id": self.rid, "object": self.object + ("" if self.prep.kind == "completion" else ".chunk"),
                "created": int(time.time()), "model": self.server.model_name, "choices": choices}
        if usage_body is not None or self._wants_usage():
            body["usage"] = usage_body
        return f"data: {json.dumps(body)}\n\n"

    def _wants_usage(self) -> bool:
        options = self.prep.request.stream_options
        return bool(options and options.include_usage)

    async def sse(self):
        chat = self.prep.kind == "chat"
        try:
            if chat:
                yield self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None} for i in range(len(self.final))])
            elif self.prep.request.echo:
                yield self._chunk([{"index": i, "text": self.prep.prompt_texts[i // self.prep.n], "logprobs": None,
                                    "finish_reason": None} for i in range(len(self.final))])
            while not self._done():
                index, out = await self._next()
                delta, new_ids = self.texts[index].update(out)
                if not (delta or new_ids or out.finished):
                    continue
                logprobs = self._choice_logprobs(index, out)
                reason = out.finish_reason if out.finished else None
                if chat:
                    choice = {"index": index, "delta": {"content": delta} if delta else {}, "logprobs": logprobs,
                              "finish_reason": reason}
                else:
                    choice = {"index": index, "text": delta, "logprobs": logprobs, "finish_reason": reason}
                    if out.finished:
                        choice["stop_reason"] = out.stop_reason
                yield self._chunk([choice])
            if self._wants_usage():
                yield self._chunk([], self._usage())
            yield "data: [DONE]\n\n"
        except EngineDeadError as e:  # an error frame, then the end of the stream
            yield f"data: {json.dumps(ApiError(503, str(e)).body())}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self._finish()


def _is_ids(prompt) -> bool:
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(t, int) for t in prompt)


def _default_name(model_path: str) -> str:
    from serve.engine.config import DEFAULT_MODEL

    return "moe-serve-default" if str(model_path) == str(DEFAULT_MODEL) else model_path.rstrip("/").split("/")[-1]


async def _read_body(request: Request, max_bytes: int) -> bytes:
    """The body, refusing (413) before reading more than ``max_bytes``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, f"request body ({declared} bytes) exceeds server.max_request_bytes ({max_bytes})")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise ApiError(413, f"request body (> {max_bytes} bytes) exceeds server.max_request_bytes ({max_bytes})")
        chunks.append(chunk)
    return b"".join(chunks)


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _api_error(request: Request, error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)
