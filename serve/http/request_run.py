"""One admitted HTTP request (:class:`RequestRun`): its group's engine outputs -> SSE chunks or one JSON body.

A request that a drain or a dead engine cuts short ends visibly: a 503, or in a stream an error event in OpenAI's
schema then ``[DONE]``; never a 200 with ``finish_reason: "abort"``.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from serve.engine.sampling_params import SamplingParams
from serve.http.engine_loop import EngineDeadError, RequestGroup
from serve.http.openai_format import ChoiceText, usage
from serve.http.protocol import ApiError, ChatRequest, CompletionRequest


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


class RequestRun:
    """One admitted HTTP request: turns its group's outputs into SSE chunks or a single response body."""

    def __init__(self, server, prep: Prepared, rid: str, group: RequestGroup) -> None:
        self.server, self.prep, self.rid, self.group = server, prep, rid, group
        stops = prep.params[0].stop
        self.texts = [ChoiceText(server.tokenizer, prep.prompt_ids[i // prep.n], stops) for i in range(len(group.subs))]
        self.final: list = [None] * len(group.subs)
        self.logprobs_sent = [0] * len(group.subs)
        self.text_offset = [0] * len(group.subs)
        self.object = "chat.completion" if prep.kind == "chat" else "text_completion"

    async def _next(self):
        index, item = await self.group.queue.get()
        if isinstance(item, Exception):
            raise item
        if item.finished and item.finish_reason == "abort":  # only a drain aborts a request someone still reads
            raise EngineDeadError(f"the server is shutting down: the request was aborted after "
                                  f"server.drain_timeout_s ({self.server.config.drain_timeout_s:g} s)")
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
        if self._done():  # the latencies are the engine loop's (ServerMetrics.on_step); these are per request
            self.server.metrics.on_request_done(self.prep.n, [p.max_tokens for p in self.prep.params], self.final)

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
                if self.server.tokenizer is None:  # no text without a tokenizer: the ids are the answer
                    choice["token_ids"] = out.token_ids
            choices.append(choice)
        return {"id": self.rid, "object": self.object, "created": int(time.time()), "model": self.server.model_name,
                "system_fingerprint": self.server.fingerprint, "choices": choices, "usage": self._usage()}

    # -- streaming ----------------------------------------------------------------------------------------------
    def _chunk(self, choices: list[dict], usage_body: dict | None = None) -> str:
        body = {"id": self.rid, "object": self.object + ("" if self.prep.kind == "completion" else ".chunk"),
                "created": int(time.time()), "model": self.server.model_name,
                "system_fingerprint": self.server.fingerprint, "choices": choices}
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
                    if self.server.tokenizer is None:
                        choice["token_ids"] = new_ids
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


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
