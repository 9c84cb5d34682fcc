"""The OpenAI wire format: request bodies (pydantic, unknown fields ignored) and errors in OpenAI's schema.

Every way a body can be wrong ends in :class:`ApiError` with a 4xx status and a ``param`` naming the field:
too large (413), not JSON or JSON nested too deep (400), a string holding a lone UTF-16 surrogate (``"\\ud800"``,
legal JSON but not Unicode text; 400), wrong types or out-of-range values (400; FastAPI's 422 is mapped to 400 as
OpenAI does). Validation is strict, as OpenAI's is: no coercion (``"3"`` is not an int, ``true`` not a number).
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request

Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
MAX_N = 128
MAX_STOPS = 4  # OpenAI's limit
ROLES = ("system", "user", "assistant", "tool", "developer")
Body = TypeVar("Body", bound=BaseModel)
_SURROGATE = re.compile("[\ud800-\udfff]")
# a surrogate as a JSON escape, or raw (UTF-8-encoded: ED A0..BF): json.loads decodes bytes with "surrogatepass"
_MAYBE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")
_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "function-after", "literal"}


class ApiError(Exception):
    """An HTTP error with OpenAI's body ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}

    @property
    def type(self) -> str:
        return {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 408: "invalid_request_error", 413: "invalid_request_error",
                415: "invalid_request_error", 429: "rate_limit_exceeded",
                503: "service_unavailable"}.get(self.status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}

    @classmethod
    def from_value_error(cls, error: ValueError) -> ApiError:
        """Our ValueErrors start with the field they blame: ``"top_p (1.5) must be in (0, 1]"``,
        ``"prompt token ids ([99999]) must be ..."`` (-> ``prompt``)."""
        message = str(error)
        match = re.match(r"(\w+)[\w ]* \(", message)
        return cls(400, message, match.group(1) if match else None)


STRICT = ConfigDict(extra="ignore", strict=True)
Penalty = Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)]


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


class _Request(BaseModel):
    model_config = STRICT

    model: str | None = None
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = None
    min_p: float | None = Field(None, ge=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOPS)] | None = None
    seed: Int64 | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    user: str | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    repetition_penalty: float | None = Field(None, gt=0, le=10, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None
    response_format: dict | None = None  # text, json_object or json_schema: see response_schema
    # special-token strings typed into message contents are text (false: they become the tokens); a completion
    # prompt is the model's raw input, often a client-rendered template, so there they are tokens unless true
    split_special_tokens: bool = True


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = None  # refused unless it equals n (not implemented)
    suffix: str | None = None  # refused when non-empty (insertion is not implemented)
    split_special_tokens: bool = False  # as vLLM and transformers encode a prompt string


class TextPart(BaseModel):
    model_config = STRICT

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = STRICT

    role: Literal[ROLES]  # type: ignore[valid-type]
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
    # refused when they ask for something (tool calling is not implemented yet)
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None
    function_call: str | dict | None = None


def refuse_unsupported(req: _Request) -> None:
    """400 naming a field that asks for what this server does not do yet, rather than ignoring it (a 200 that
    silently skipped the field would be a wrong answer)."""
    later = "is not supported yet (tool calling is planned)"
    response_schema(req.response_format)
    if isinstance(req, ChatRequest):
        for name in ("tools", "functions"):
            if getattr(req, name):
                raise ApiError(400, f"{name} ({len(getattr(req, name))} given): tool calling {later}", name)
        for name in ("tool_choice", "function_call"):
            if getattr(req, name) not in (None, "none"):
                raise ApiError(400, f"{name} ({_short(getattr(req, name))}): tool calling {later}", name)
    if isinstance(req, CompletionRequest):
        if req.best_of is not None and req.best_of != req.n:
            raise ApiError(400, f"best_of ({req.best_of}) {later.split(' (')[0]}; use n", "best_of")
        if req.suffix:
            raise ApiError(400, f"suffix ({_short(req.suffix)}): insertion {later.split(' (')[0]}", "suffix")


def response_schema(fmt: dict | None) -> dict | None:
    """OpenAI's ``response_format`` -> the JSON schema the output must follow, or None for free text.

    ``{"type": "text"}`` (or none) -> None; ``{"type": "json_object"}`` -> ``{"type": "object"}``;
    ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`` -> its ``schema``, enforced whatever
    ``strict`` says. Anything else is a 400 naming ``response_format`` (the schema itself is checked when the
    server compiles it)."""
    kind = "text" if fmt is None else fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind != "json_schema":
        raise ApiError(400, f"response_format.type ({_short(kind)}) must be 'text', 'json_object' or 'json_schema'",
                       "response_format")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise ApiError(400, f"response_format.json_schema ({_short(spec)}) must be an object whose 'schema' is a "
                       "JSON schema object", "response_format")
    name, strict = spec.get("name"), spec.get("strict")
    if name is not None and not (isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name)):
        raise ApiError(400, f"response_format.json_schema.name ({_short(name)}) must be 1 to 64 letters, digits, "
                       "underscores or dashes", "response_format")
    if strict is not None and not isinstance(strict, bool):
        raise ApiError(400, f"response_format.json_schema.strict ({_short(strict)}) must be a boolean",
                       "response_format")
    return spec["schema"]


def logit_bias_ids(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float]:
    """OpenAI's ``{"<token id>": bias}`` -> ``{id: bias}``; 400 naming a key that is not a token id."""
    out = {}
    for key, value in (bias or {}).items():
        if not (key.isascii() and key.isdigit() and int(key) < vocab_size):
            raise ApiError(400, f"logit_bias ({_short(key)}) keys must be token ids in [0, {vocab_size})",
                           "logit_bias")
        if value != value or value in (float("inf"), float("-inf")):
            raise ApiError(400, f"logit_bias ({key}: {value}) values must be finite numbers", "logit_bias")
        out[int(key)] = value
    return out


async def read_body(request: Request, max_bytes: int) -> bytes:
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


def parse_body(raw: bytes, model: type[Body], max_bytes: int, max_items: int | None = None,
               max_keys: int | None = None) -> Body:
    """Bytes -> validated request, or :class:`ApiError` (never anything else). ``max_items`` / ``max_keys``: see
    :func:`check_sizes`."""
    if len(raw) > max_bytes:
        raise ApiError(413, f"request body ({len(raw)} bytes) exceeds server.max_request_bytes ({max_bytes})")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ApiError(400, f"body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"body must be a JSON object, got {type(data).__name__}")
    check_sizes(data, max_items, max_keys)
    if _MAYBE_SURROGATE.search(raw):  # only then can a string hold one
        check_unicode(data)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e.errors(include_url=False)) from None
    except RecursionError:
        raise ApiError(400, "body is nested too deeply") from None


def check_sizes(data: dict, max_items: int | None, max_keys: int | None, depth: int = 3) -> None:
    """400 for a list longer than ``max_items`` or an object with more than ``max_keys`` keys down to ``depth``
    levels below the body (``messages.0.content`` is 3), before validation: no valid request holds one (token ids
    are fewer than the context, prompts at most ``max_sub_requests_per_request``, ``logit_bias`` keys at most one
    per token), and validating a few million items holds the event loop, and the GIL, for seconds (a 16 MB list
    of token ids: ~10 s)."""
    level: list[tuple[str, dict | list]] = [("", data)]
    for _ in range(depth + 1):
        below: list[tuple[str, dict | list]] = []
        for path, value in level:
            limit, what = (max_keys, "keys") if isinstance(value, dict) else (max_items, "items")
            if path and limit is not None and len(value) > limit:
                name = ascii(path)[1:-1]
                raise ApiError(400, f"{name} has {len(value)} {what}; no valid request has more than {limit}",
                               name.split(".")[0])
            items = value.items() if isinstance(value, dict) else enumerate(value)
            below.extend((f"{path}.{key}" if path else str(key), item) for key, item in items
                         if isinstance(item, (dict, list)))
        level = below


def check_unicode(data: dict) -> None:
    """400 naming the first string (value or key, at any depth) that holds a lone UTF-16 surrogate: JSON can
    escape one (``"\\ud800"``) but it is not text, and the tokenizer, the template and the response encoder
    would all fail on it. Iterative: ``json.loads`` accepts nestings deeper than Python's recursion limit."""
    stack: list[tuple[str, object]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            bad = _SURROGATE.search(value)
            if bad:
                field = path or "body"
                raise ApiError(400, f"{field} ({_short(value)}) contains a lone UTF-16 surrogate "
                               f"(U+{ord(bad.group()):04X} at {bad.start()}); send valid Unicode text",
                               field.split(".")[0] or None)
        elif isinstance(value, dict):
            for key, item in value.items():
                name = ascii(str(key))[1:-1]  # the path goes into the error body: keep it encodable
                child = f"{path}.{name}" if path else name
                stack.append((child, key))
                stack.append((child, item))
        elif isinstance(value, list):
            stack.extend((f"{path}.{i}", item) for i, item in enumerate(value))


def _short(value: object) -> str:
    text = ascii(value)  # ascii(): a surrogate or control character shows as its escape
    return text if len(text) <= 80 else text[:77] + "..."


def validation_error(errors: list[dict]) -> ApiError:
    """pydantic/FastAPI errors -> one 400 naming the first bad field and the value it got."""
    first = errors[0]
    # drop "body" and the union-member tags pydantic adds ("str", "list[int]", ...): the path is the field's
    loc = [str(part) for part in first.get("loc", ()) if part != "body" and str(part).lower() not in _UNION_TAGS
           and re.fullmatch(r"\w+", str(part))]
    param = ".".join(loc) or None
    value = _short(first.get("input"))
    return ApiError(400, f"{param or 'body'} ({value}): {first.get('msg', 'invalid value')}", param)
