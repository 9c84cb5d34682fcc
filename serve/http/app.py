"""The OpenAI-compatible HTTP API (FastAPI): ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``,
``/health``, ``/metrics`` (vLLM's metric names), ``/v1/moe/routing``, and vLLM's ``/tokenize``, ``/detokenize`` and
``/version`` (:mod:`serve.http.tokenize_routes`).

A request goes: body -> :mod:`serve.http.protocol` (4xx on anything malformed) -> prompts tokenized (in a worker
thread) and checked against the context -> one engine sub-request per prompt and choice (``n``), admitted
together by :class:`serve.http.engine_loop.EngineLoop` (429 + ``Retry-After`` when the queue is full) -> SSE
chunks or one JSON body. Whatever way the handler ends (done, client gone, shutdown), what is left of its
sub-requests is aborted, so their KV blocks come back within one engine step. A request that a drain (or a dead
engine) cuts short ends visibly: a 503, or in a stream an error event then ``[DONE]``; never a 200.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from serve.engine import LLMEngine
from serve.engine.core_process import EngineCoreClient, EngineCoreError
from serve.engine.sampling_params import SamplingParams
from serve.engine.scheduler import QueueFullError
from serve.http.config import ServerConfig
from serve.http.connections import RequestGuard
from serve.http.core_loop import CoreEngineLoop
from serve.http.engine_loop import EngineDeadError, EngineLoop, SubRequest
from serve.http.metrics import ServerMetrics
from serve.http.openai_format import LogprobFormatter
from serve.http.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    logit_bias_ids,
    parse_body,
    read_body,
    refuse_unsupported,
    response_schema,
    validation_error,
)
from serve.http.request_run import Prepared, RequestRun
from serve.http.tokenize_routes import TokenizeRoutes

log = logging.getLogger("moe-serve")
API_KEY_ENV = "MOE_SERVE_API_KEY"


class OpenAIServer:
    """The application state: engine loop, metrics, model name; ``app`` is the FastAPI application."""

    def __init__(self, engine: LLMEngine | EngineCoreClient, config: ServerConfig, routing_stats=None) -> None:
        """``engine``: an engine in this process (stepped on a thread of it), or an engine core in a process of
        its own (which steps on its own and updates ``routing_stats`` itself: here they are only read)."""
        self.engine, self.config, self.routing_stats = engine, config, routing_stats
        self.tokenizer = engine.tokenizer
        self.model_name = config.served_model_name or _default_name(engine.config.model)
        self.metrics = ServerMetrics(self.model_name, engine.max_model_len, routing_stats, config.max_expert_series)
        self.loop: EngineLoop | CoreEngineLoop = CoreEngineLoop(engine, self.metrics.on_step, config.stall_s) \
            if isinstance(engine, EngineCoreClient) else EngineLoop(engine, self._on_step, config.stall_s)
        self.logprob_format = LogprobFormatter(self.tokenizer)
        self.draining = False
        self.created = int(time.time())
        self.api_key = config.api_key or os.environ.get(API_KEY_ENV) or None
        self.fingerprint = "fp_" + hashlib.sha256(f"{self.model_name}|{engine.config}".encode()).hexdigest()[:12]
        if self.tokenizer is None:
            log.warning("%s has no tokenizer: prompts must be token ids, completions answer with \"text\": \"\" "
                        "and the generated ids in each choice's \"token_ids\", chat and stop strings are refused",
                        self.model_name)
        self.app = self._build_app()

    def _on_step(self, counters, outputs) -> None:
        self.metrics.on_step(counters, outputs)
        if self.routing_stats is not None:
            self.routing_stats.step()

    # -- lifecycle ----------------------------------------------------------------------------------------------
    async def drain(self, poll_s: float = 0.05) -> None:
        """Refuse new requests (503, ``/health`` 503) while what runs gets ``drain_timeout_s`` to finish; abort the
        rest (their clients get a 503 or a stream error event). The listening socket stays open meanwhile."""
        self.draining = True
        deadline = time.monotonic() + self.config.drain_timeout_s
        while self.loop.busy() and time.monotonic() < deadline:
            await asyncio.sleep(poll_s)
        self.loop.abort_all()

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
        TokenizeRoutes(self).register(app)  # /tokenize, /detokenize, /version
        cfg = self.config
        if cfg.cors_allowed_origins:
            app.add_middleware(CORSMiddleware, allow_origins=cfg.cors_allowed_origins, allow_methods=["GET", "POST"],
                               allow_headers=["Authorization", "Content-Type"])
        app.add_middleware(RequestGuard, allowed_origins=cfg.cors_allowed_origins, body_timeout_s=cfg.body_timeout_s)
        return app

    # -- small endpoints ----------------------------------------------------------------------------------------
    async def health(self) -> Response:
        ok, reason = self.loop.health()
        if self.draining:
            ok, reason = False, "draining"
        return JSONResponse({"status": "ok" if ok else "unavailable", "reason": reason}, 200 if ok else 503)

    async def prometheus(self) -> Response:
        body = await asyncio.to_thread(self.metrics.render)  # expert series may ask an engine core (a round trip)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    def _auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "Authorization (missing or wrong): send 'Authorization: Bearer <server.api_key>'",
                           "Authorization", headers={"WWW-Authenticate": "Bearer"})

    async def models(self, request: Request) -> dict:
        self._auth(request)
        return {"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": self.created, "owned_by": "moe-serve",
            "max_model_len": self.engine.max_model_len}]}

    async def routing(self, request: Request) -> dict:
        self._auth(request)
        if self.routing_stats is None:
            raise ApiError(404, "routing statistics are off (server.routing_stats=false)")
        try:
            stats = await asyncio.to_thread(self.routing_stats.to_dict)
        except (EngineCoreError, TimeoutError) as e:  # a dead core, or one that did not answer between steps
            raise ApiError(503, f"routing statistics unavailable: {e or 'the engine core did not answer'}",
                           headers={"Retry-After": "5"}) from None
        return {**stats, "model": stats.get("model") or self.model_name}

    # -- generation ---------------------------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        self._auth(request)
        req = await self._parse(request, CompletionRequest)
        self._check(req)
        await self._compile_schema(req)
        if req.echo and req.logprobs is not None:
            raise ApiError(400, "echo with logprobs (prompt logprobs) is not supported", "echo")
        texts_or_ids = [req.prompt] if isinstance(req.prompt, str) or _is_ids(req.prompt) else req.prompt
        if not texts_or_ids:
            raise ApiError(400, "prompt ([]) must not be empty", "prompt")
        self._check_fan_out(len(texts_or_ids), req.n)
        prompts = [await self._tokenize(p, req.split_special_tokens) for p in texts_or_ids]
        prep = self._prepare("completion", req, prompts, req.max_tokens, req.logprobs)
        return await self._respond(prep, request)

    async def chat_completions(self, request: Request) -> Response:
        self._auth(request)
        req = await self._parse(request, ChatRequest)
        self._check(req)
        await self._compile_schema(req)
        self._check_fan_out(1, req.n)
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, f"top_logprobs ({req.top_logprobs}) requires logprobs=true", "top_logprobs")
        if self.tokenizer is None or self.tokenizer.chat_template is None:
            raise ApiError(400, "messages: this model has no chat template; use /v1/completions", "messages")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        self._check_length(sum(len(m["content"]) for m in messages), "messages")
        try:
            ids = await asyncio.to_thread(self.tokenizer.encode_chat, messages,
                                          split_special_tokens=req.split_special_tokens)
        except Exception as e:  # a template may raise anything (jinja's raise_exception, bad roles, ...)
            raise ApiError(400, f"messages: the chat template rejected them: {e}", "messages") from None
        max_tokens = req.max_completion_tokens or req.max_tokens
        prep = self._prepare("chat", req, [(ids, "")], max_tokens, (req.top_logprobs or 0) if req.logprobs else None)
        return await self._respond(prep, request)

    async def _parse(self, request: Request, model):
        """The validated body; lists longer than any valid request holds are refused before validation."""
        limit = self.config.max_request_bytes
        return parse_body(await read_body(request, limit), model, limit,
                          max(self.engine.max_model_len, self.config.max_sub_requests_per_request),
                          self.engine.vocab_size)

    def _check(self, req: CompletionRequest | ChatRequest) -> None:
        self._check_model(req.model)
        refuse_unsupported(req)
        req.logit_bias = logit_bias_ids(req.logit_bias, self.engine.vocab_size)

    async def _compile_schema(self, req: CompletionRequest | ChatRequest) -> None:
        """Compile ``response_format``'s schema in a worker thread, off the engine's step (``add_request`` then
        copies it from the engine's cache); 400 naming ``response_format`` when it is not a valid schema."""
        schema = response_schema(req.response_format)
        if schema is None:
            return
        if self.engine.grammars is None:
            raise ApiError(400, "response_format: this model has no tokenizer to constrain its output with",
                           "response_format")
        try:
            await asyncio.to_thread(self.engine.grammars.compile, schema)
        except ValueError as e:
            raise ApiError(400, f"response_format: {e}", "response_format") from None

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(404, f"model ({model!r}) does not exist; this server serves {self.model_name!r}", "model")

    def _check_fan_out(self, num_prompts: int, n: int) -> None:
        """A request whose prompts x ``n`` sub-requests could never be admitted is a 400, not a 429 to retry."""
        total, what = num_prompts * n, f"prompts ({num_prompts}) x n ({n}) = {num_prompts * n} sub-requests"
        limit = self.config.max_sub_requests_per_request
        if total > limit:
            raise ApiError(400, f"{what} exceed server.max_sub_requests_per_request ({limit})", "n")
        queue = self.engine.config.max_queued_requests
        if total > queue:
            raise ApiError(400, f"{what} exceed engine.max_queued_requests ({queue}): they could never be "
                           "queued at once", "n")

    def _check_length(self, chars: int, param: str) -> None:
        """Refuse at once a text too long for the context by its length alone (before tokenising it)."""
        limit = self.engine.max_model_len
        at_least = -(-chars // self.tokenizer.max_token_chars) if self.tokenizer.max_token_chars else 0
        if at_least >= limit:
            raise ApiError(400, f"{param} has {chars} characters, so at least {at_least} tokens; the context "
                           f"(max_model_len) is {limit} tokens", param)

    async def _tokenize(self, prompt: str | list[int], split_special_tokens: bool) -> tuple[list[int], str]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ApiError(400, "prompt (str): this model has no tokenizer; send token ids", "prompt")
            if not prompt:
                raise ApiError(400, "prompt ('') must not be empty", "prompt")
            self._check_length(len(prompt), "prompt")
            return await asyncio.to_thread(self.tokenizer.encode, prompt,
                                           split_special_tokens=split_special_tokens), prompt
        if not prompt:
            raise ApiError(400, "prompt ([]) must not be empty", "prompt")
        vocab = self.engine.vocab_size
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
                min_p=req.min_p or 0.0, seed=seed, stop=req.stop, ignore_eos=req.ignore_eos, logprobs=logprobs,
                presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
                repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
                logit_bias=req.logit_bias, json_schema=response_schema(req.response_format))
        except ValueError as e:
            raise ApiError.from_value_error(e) from None

    async def _respond(self, prep: Prepared, request: Request) -> Response:
        if self.draining:
            raise ApiError(503, "the server is shutting down", headers={"Retry-After": "5"})
        rid = ("chatcmpl-" if prep.kind == "chat" else "cmpl-") + uuid.uuid4().hex
        # choice j > 0 of a prompt waits for choice 0 to compute the prompt, then shares its blocks
        subs = [SubRequest(f"{rid}-{i}", prep.prompt_ids[i // prep.n], p, f"{rid}-{i - i % prep.n}" if i % prep.n
                           else None, prep.arrival) for i, p in enumerate(prep.params)]
        try:
            group = await self.loop.submit(subs)
        except QueueFullError as e:
            self.metrics.rejections["max_num_queued_reqs"].inc()
            raise ApiError(429, f"the server is busy: {e}", headers={"Retry-After": "1"}) from None
        except EngineDeadError as e:
            raise ApiError(503, str(e), headers={"Retry-After": "5"}) from None
        except ValueError as e:
            raise ApiError.from_value_error(e) from None
        run = RequestRun(self, prep, rid, group)
        if prep.request.stream:
            return StreamingResponse(run.sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await run.collect(request)


def _is_ids(prompt) -> bool:
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(t, int) for t in prompt)


def _default_name(model_path: str) -> str:
    from serve.engine.config import DEFAULT_MODEL

    return "moe-serve-default" if str(model_path) == str(DEFAULT_MODEL) else model_path.rstrip("/").split("/")[-1]


def _api_error(request: Request, error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)
