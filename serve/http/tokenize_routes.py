"""``POST /tokenize``, ``POST /detokenize`` and ``GET /version``, with vLLM's schemas
(``vllm/entrypoints/serve/tokenize/protocol.py``).

``/tokenize`` takes a completion body ``{"model", "prompt", "add_special_tokens" (true)}`` or a chat body
``{"model", "messages", "add_generation_prompt" (true), "add_special_tokens" (false), "chat_template_kwargs"}``
and answers ``{"count", "max_model_len", "tokens"}`` (and ``"token_strs"`` with ``return_token_strs``);
``/detokenize`` takes ``{"model", "tokens"}`` and answers ``{"prompt"}`` (special tokens kept, as vLLM does);
``/version`` answers ``{"version"}``, this package's. The bounds are the completion endpoints': the server's
auth, ``server.max_request_bytes``, strict types, Unicode text, and a text whose length alone rules out the
context is refused before it is tokenized (400). Unlike vLLM, ``continue_final_message``, a request's own
``chat_template`` and ``tools`` are refused (400) until the chat endpoint has them.
"""

from __future__ import annotations

import asyncio
from importlib import metadata

from fastapi import FastAPI, Request
from pydantic import BaseModel, Field

from serve.http.protocol import STRICT, ApiError, ChatMessage, Int64

DISTRIBUTION = "moe-serve"


class TokenizeRequest(BaseModel):
    """vLLM's ``TokenizeCompletionRequest | TokenizeChatRequest`` as one body: ``prompt`` or ``messages``."""

    model_config = STRICT

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = None  # vLLM's defaults: true for a prompt, false for messages
    # as the completion and chat endpoints encode them: special-token text is text in messages, tokens in a prompt
    split_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool | None = False
    chat_template: str | None = None
    chat_template_kwargs: dict | None = None
    tools: list | None = None


class DetokenizeRequest(BaseModel):
    model_config = STRICT

    model: str | None = None
    tokens: list[Int64]


def package_version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


class TokenizeRoutes:
    """The three endpoints of one :class:`serve.http.app.OpenAIServer` (``server``); ``register(app)`` adds them."""

    def __init__(self, server) -> None:
        self.server = server

    def register(self, app: FastAPI) -> None:
        app.post("/tokenize")(self.tokenize)
        app.post("/detokenize")(self.detokenize)
        app.get("/version")(self.version)

    async def version(self, request: Request) -> dict:
        self.server._auth(request)
        return {"version": package_version()}

    async def _body(self, request: Request, model):
        """Authorised, parsed as the completion endpoints parse (sizes bounded before validation), for this model."""
        self.server._auth(request)
        req = await self.server._parse(request, model)
        self.server._check_model(req.model)
        return req

    async def tokenize(self, request: Request) -> dict:
        server = self.server
        req = await self._body(request, TokenizeRequest)
        if (req.prompt is None) == (req.messages is None):
            raise ApiError(400, "prompt or messages: give exactly one of them (a completion or a chat body)",
                           "messages" if req.prompt is not None else "prompt")
        tokenizer = server.tokenizer
        if tokenizer is None:
            raise ApiError(400, "this model has no tokenizer: nothing to tokenize with",
                           "prompt" if req.prompt is not None else "messages")
        ids = await (self._chat(req) if req.messages is not None else self._completion(req))
        body: dict = {"count": len(ids), "max_model_len": server.engine.max_model_len, "tokens": ids}
        if req.return_token_strs:
            body["token_strs"] = [tokenizer.hf.id_to_token(t) for t in ids]
        return body

    async def _completion(self, req: TokenizeRequest) -> list[int]:
        assert req.prompt is not None
        self.server._check_length(len(req.prompt), "prompt")
        special = True if req.add_special_tokens is None else req.add_special_tokens
        return await asyncio.to_thread(self.server.tokenizer.encode, req.prompt, special,
                                       bool(req.split_special_tokens))

    async def _chat(self, req: TokenizeRequest) -> list[int]:
        assert req.messages is not None
        tokenizer = self.server.tokenizer
        for name in ("continue_final_message", "chat_template", "tools"):
            if getattr(req, name):
                raise ApiError(400, f"{name} is not supported yet (the chat endpoint does not have it either)", name)
        if tokenizer.chat_template is None:
            raise ApiError(400, "messages: this model has no chat template; send a prompt", "messages")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        self.server._check_length(sum(len(m["content"]) for m in messages), "messages")
        kwargs = req.chat_template_kwargs or {}
        split = req.split_special_tokens is not False
        try:
            if not req.add_special_tokens:  # the ids the chat endpoint gives the model
                return await asyncio.to_thread(tokenizer.encode_chat, messages, req.add_generation_prompt, split,
                                               **kwargs)
            text = await asyncio.to_thread(tokenizer.apply_chat_template, messages, req.add_generation_prompt,
                                           **kwargs)
        except Exception as e:  # a template may raise anything (jinja's raise_exception, bad roles, kwargs, ...)
            raise ApiError(400, f"messages: the chat template rejected them: {e}", "messages") from None
        # add_special_tokens: the rendered text through the tokenizer's post-processor, as vLLM encodes it
        return await asyncio.to_thread(tokenizer.encode, text, True)

    async def detokenize(self, request: Request) -> dict:
        server = self.server
        req = await self._body(request, DetokenizeRequest)
        if server.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer: nothing to detokenize with", "tokens")
        vocab = server.engine.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"tokens ({bad[:5]}) must be token ids in [0, {vocab})", "tokens")
        prompt = await asyncio.to_thread(server.tokenizer.decode, req.tokens, False)
        return {"prompt": prompt}
