"""The OpenAI wire format: request bodies (pydantic, unknown fields ignored) and errors in OpenAI's schema.

Every way a body can be wrong ends in :class:`ApiError` with a 4xx status and a ``param`` naming the field:
too large (413), not JSON or JSON nested too deep (400), wrong types or out-of-range values (400; FastAPI's 422
is mapped to 400 as OpenAI does).
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
MAX_N = 128


class ApiError(Exception):
    """An HTTP error with OpenAI's body ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}

    @property
    def type(self) -> str:
        return {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
                429: "rate_limit_exceeded", 503: "service_unavailable"}.get(self.status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}

    @classmethod
    def from_value_error(cls, error: ValueError) -> ApiError:
        """Our ValueErrors start with the field they blame: ``"top_p (1.5) must be in (0, 1]"``,
        ``"prompt token ids ([99999]) must be ..."`` (-> ``prompt``)."""
        message = str(error)
        match = re.match(r"(\w+)[\w ]* \(", message)
        return cls(400, message, match.group(1) if match else None)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = None
    min_p: float | None = Field(None, ge=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: Int64 | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


def parse_body(raw: bytes, model: type[BaseModel], max_bytes: int) -> BaseModel:
    """Bytes -> validated request, or :class:`ApiError` (never anything else)."""
    if len(raw) > max_bytes:
        raise ApiError(413, f"request body ({len(raw)} bytes) exceeds server.max_request_bytes ({max_bytes})")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ApiError(400, f"body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e.errors(include_url=False)) from None
    except RecursionError:
        raise ApiError(400, "body is nested too deeply") from None


def validation_error(errors: list[dict]) -> ApiError:
    """pydantic/FastAPI errors -> one 400 naming the first bad field and the value it got."""
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    value = repr(first.get("input"))
    value = value if len(value) <= 80 else value[:77] + "..."
    return ApiError(400, f"{param or 'body'} ({value}): {first.get('msg', 'invalid value')}", param)
