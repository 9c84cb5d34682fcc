"""Issue 19: hypothesis over every field of ``/v1/completions`` and ``/v1/chat/completions`` against one real
``moe-serve`` (the default model, a 64-token context so that accepted requests stay cheap). Bodies mix plausible
values with wrong types, extreme numbers, nested junk, lone surrogates (``\\ud800`` escapes, as ``json.dumps``
writes them, and raw surrogate bytes, which are not UTF-8), control characters, unknown fields, truncated JSON and
random bytes. Whatever comes: never a 5xx, never a dropped connection, every 4xx in OpenAI's error schema, every
200 complete (a stream ends with ``[DONE]`` and carries no 5xx error event), and ``/health`` 200 afterwards."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from benchmarks.server import running_server
from serve.http.protocol import (
    ApiError,
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    StreamOptions,
    TextPart,
    parse_body,
)

OVERRIDES = ("model.max_model_len=64", "engine.max_num_seqs=8", "engine.max_num_batched_tokens=64",
             "engine.max_queued_requests=64", "server.max_request_bytes=100000")
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def server():
    with running_server(*OVERRIDES) as s, httpx.Client(base_url=s.v1, timeout=120) as client:
        s.client = client
        yield s
        _check_healthy(s)  # after the slow variants too


def _check_healthy(server) -> None:
    server.wait_idle()
    start = time.monotonic()
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    assert time.monotonic() - start < 1
    assert "Traceback" not in server.log(), server.log()[-3000:]


# -- values ------------------------------------------------------------------------------------------------------
SAFE_ODD = ["\x00", "\x07", "\x1b[2J", "\x7f", "\u2028", "\ufeff", "\ufffe", "\U0001f600", "\r\n", "\t", '"', "\\",
            "<|im_end|>", "<|endoftext|>", "{{ raise_exception('x') }}"]
SURROGATES = ["\ud800", "\udfff", "\udbff\udbff", "x\udc00"]
TEXT = st.text(max_size=12) | st.lists(st.sampled_from(SAFE_ODD) | st.text(max_size=3), max_size=4).map("".join)
LONE = st.lists(st.sampled_from(SURROGATES + SAFE_ODD) | st.text(max_size=3), min_size=1, max_size=4).map(
    lambda parts: "".join(parts) + SURROGATES[len(parts) % 4])  # always holds one
KEY = TEXT | LONE | st.sampled_from(["", "__proto__", "$ref", "constructor", "prompt ", "PROMPT"])
EXTREME = st.sampled_from([0, -1, 1, 2**31, -(2**31) - 1, 2**53 + 1, 2**63, -(2**63) - 1, 2**64, 10**30, 10**400,
                           1e308, -1e308, 5e-324, -0.0, 1e-6, 0.5, 1.0000001, float("nan"), float("inf"),
                           float("-inf")])
SCALAR = st.none() | st.booleans() | st.integers(-5, 300) | st.floats(-3, 3) | EXTREME | TEXT | LONE
JUNK = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEY, inner, max_size=3),
                    max_leaves=6)
SCHEMA = st.sampled_from([
    {"type": "object"}, {"type": "integer"}, {"enum": ["a", "b"]}, {"type": "array", "maxItems": 2},
    {"type": "object", "properties": {"x": {"type": "string", "maxLength": 3}}, "required": ["x"]},
    {"type": "string", "pattern": "[a-z]{2}"}])
BAD_SCHEMA = st.sampled_from([{"type": "nonsense"}, {"$ref": "#/nowhere"}, {"type": "string", "pattern": "("},
                              {"not": {}}, {"type": "string", "pattern": "\ud800"}]) | JUNK
FORMAT = st.sampled_from([{"type": "text"}, {"type": "json_object"}]) | st.fixed_dictionaries(
    {"type": st.just("json_schema"), "json_schema": st.fixed_dictionaries(
        {"schema": SCHEMA}, optional={"name": st.just("answer"), "strict": st.booleans()})})
BAD_FORMAT = st.fixed_dictionaries({"type": st.sampled_from(["json_schema", "xml", ""]) | LONE}, optional={
    "json_schema": st.fixed_dictionaries({"schema": BAD_SCHEMA}, optional={"name": TEXT | LONE, "strict": JUNK})})
FEW_TOKENS = st.integers(1, 6)  # accepted requests stay cheap; the context (64) refuses larger ones anyway
TOKEN_IDS = st.lists(st.integers(0, 1000), min_size=1, max_size=6)

# each field: (valid values, values just outside its limits or of the wrong kind); body() adds junk of any type
COMMON = {
    "model": (st.just("moe-serve-default"), st.sampled_from(["gpt-4o", "", "moe-serve-default "]) | LONE),
    "temperature": (st.floats(0, 2) | st.sampled_from([0, 1e-6, 1e-5]), st.sampled_from([-1e-9, -1, 1e308])),
    "top_p": (st.floats(0.01, 1), st.sampled_from([0, 0.0, 1.0000001, -1])),
    "top_k": (st.integers(-1, 50), st.sampled_from([-2, 2**63, 1.5])),
    "min_p": (st.floats(0, 1), st.sampled_from([-0.1, 1.1])),
    "n": (st.integers(1, 3), st.sampled_from([0, -1, 128, 129, 10**6])),
    "stop": (TEXT | st.lists(TEXT, max_size=4), st.lists(TEXT, min_size=5, max_size=6) | LONE | st.lists(LONE)),
    "seed": (st.integers(-(2**63), 2**63 - 1), st.sampled_from([2**63, -(2**63) - 1, 2**64, 1.0])),
    "stream": (st.booleans(), st.sampled_from([0, 1, "true"])),
    "stream_options": (st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
                       st.fixed_dictionaries({"include_usage": JUNK})),
    "ignore_eos": (st.booleans(), st.sampled_from([0, "no"])),
    "user": (TEXT, LONE),
    "frequency_penalty": (st.floats(-2, 2), st.sampled_from([-2.0001, 2.5, float("nan")])),
    "presence_penalty": (st.floats(-2, 2), st.sampled_from([-3, 2.0001])),
    "repetition_penalty": (st.floats(0.01, 10), st.sampled_from([0, -1, 10.5])),
    "logit_bias": (st.dictionaries(st.integers(0, 1000).map(str), st.floats(-100, 100), max_size=3),
                   st.dictionaries(st.integers(-2, 10**6).map(str) | KEY, st.floats(-1e308, 1e308) | JUNK,
                                   min_size=1, max_size=3)),
    "response_format": (FORMAT, BAD_FORMAT),
    "split_special_tokens": (st.booleans(), st.just("yes")),
}
PROMPT = TEXT.map(lambda t: t or "x") | st.lists(TEXT.map(lambda t: t or "x"), min_size=1, max_size=3) | TOKEN_IDS \
    | st.lists(TOKEN_IDS, min_size=1, max_size=3)
BAD_PROMPT = st.sampled_from(["", [], [[]], [-1], [10**9], [1.0], [True], "x" * 300, [[1], "a"]]) | LONE \
    | st.lists(LONE, min_size=1, max_size=2) | st.lists(st.integers(-3, 2**40), min_size=1, max_size=4)
COMPLETION = {
    **COMMON, "prompt": (PROMPT, BAD_PROMPT),
    "max_tokens": (FEW_TOKENS, st.sampled_from([0, -1, 64, 10**9])),
    "logprobs": (st.integers(0, 20), st.sampled_from([-1, 21])), "echo": (st.booleans(), st.just(1)),
    "best_of": (st.just(1), st.integers(0, 3)), "suffix": (st.sampled_from(["", None]), TEXT | LONE),
}
ROLE = st.sampled_from(["system", "user", "assistant", "developer"])
PART = st.fixed_dictionaries({"type": st.just("text"), "text": TEXT})
MESSAGE = st.fixed_dictionaries({"role": ROLE, "content": TEXT | st.lists(PART, max_size=2)})
BAD_MESSAGE = st.fixed_dictionaries({}, optional={
    "role": st.sampled_from(["tool", "hacker", "", "USER"]) | LONE | JUNK,
    "content": LONE | JUNK | st.lists(st.fixed_dictionaries({"type": st.sampled_from(["image_url", "text"]),
                                                             "text": LONE | JUNK}), max_size=2)})
CHAT = {
    **COMMON,
    "messages": (st.lists(MESSAGE, min_size=1, max_size=3),
                 st.lists(MESSAGE | BAD_MESSAGE, max_size=3) | st.lists(BAD_MESSAGE, min_size=1, max_size=2)),
    "max_tokens": (FEW_TOKENS, st.sampled_from([0, 64, 10**9])),
    "max_completion_tokens": (FEW_TOKENS, st.sampled_from([0, 64, 10**9])),
    "logprobs": (st.booleans(), st.sampled_from([0, 1])), "top_logprobs": (st.integers(0, 20), st.just(21)),
    "tools": (st.just([]), st.lists(JUNK, min_size=1, max_size=2)),
    "tool_choice": (st.just("none"), st.sampled_from(["auto", "required", {"type": "function"}])),
    "functions": (st.just([]), st.lists(JUNK, min_size=1, max_size=2)),
    "function_call": (st.just("none"), st.sampled_from(["auto", {"name": "f"}])),
}


def body(fields: dict, required: str) -> st.SearchStrategy:
    """A JSON object: the real fields with valid values (``required`` there 7 times in 8), then up to two fields
    overridden with bad values (their own or junk of any type), and up to two unknown fields."""
    valid = {name: good for name, (good, _) in fields.items()}
    others = {k: v for k, v in valid.items() if k != required}
    with_it = st.fixed_dictionaries({required: valid[required]}, optional=others)
    known = st.one_of(*[with_it] * 7, st.fixed_dictionaries({}, optional=others))
    names = st.sampled_from(sorted(fields))
    bad = st.lists(names.flatmap(lambda k: st.tuples(st.just(k), fields[k][1] | JUNK)), max_size=2).map(dict)
    unknown = st.dictionaries(KEY, JUNK, max_size=2)
    return st.tuples(unknown, known, bad).map(lambda t: {**t[0], **t[1], **t[2]})


def encode(doc: dict, how: str) -> bytes:
    """``ascii``: ``json.dumps`` (a lone surrogate becomes a ``\\ud800`` escape, NaN the ``NaN`` literal);
    ``raw``: UTF-8 with surrogates passed through as bytes (not UTF-8); ``cut``: JSON truncated."""
    if how == "raw":
        return json.dumps(doc, ensure_ascii=False).encode("utf-8", "surrogatepass")
    text = json.dumps(doc).encode()
    return text[: len(text) * 2 // 3] if how == "cut" else text


ENCODING = st.sampled_from(["ascii"] * 8 + ["raw", "cut"])
RAW_BYTES = st.binary(max_size=64) | st.sampled_from([b"", b"{", b"[]", b"null", b"1e999", b'{"prompt": "x"}' * 2,
                                                      b"\xef\xbb\xbf{}", b'{"prompt": "a", "prompt": 5}'])


# -- checks ------------------------------------------------------------------------------------------------------
def post(server, path: str, content: bytes) -> httpx.Response:
    try:
        return server.client.post(path, content=content, headers={"content-type": "application/json"})
    except httpx.TransportError as e:  # a reset, a half-written response, a timeout: the server failed us
        raise AssertionError(f"{path}: {type(e).__name__}: {e} for {content[:300]!r}") from None


def check(r: httpx.Response, content: bytes) -> None:
    what = f"{r.status_code} {r.text[:300]!r} for {content[:300]!r}"
    # pytest --hypothesis-show-statistics: the share that got through to the engine, and what the rest hit
    event(f"HTTP {r.status_code}" + (f" {r.json()['error']['param']}" if r.status_code >= 400 else ""))
    assert r.status_code < 500, what
    if r.status_code >= 400:
        error = r.json()["error"]
        assert set(error) == ERROR_KEYS and isinstance(error["message"], str) and error["message"], what
        assert error["code"] == r.status_code and isinstance(error["type"], str), what
        assert error["param"] is None or isinstance(error["param"], str), what
    elif r.headers["content-type"].startswith("text/event-stream"):
        frames = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert frames and frames[-1] == "[DONE]", what
        for frame in frames[:-1]:
            chunk = json.loads(frame)
            assert "error" not in chunk or chunk["error"]["code"] < 500, what
    else:
        assert r.status_code == 200 and r.json()["choices"], what


def fuzz(server, path: str, doc: dict, how: str) -> None:
    content = encode(doc, how)
    check(post(server, path, content), content)


DEFAULT = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                          HealthCheck.too_slow])
MANY = settings(DEFAULT, max_examples=3000)


def test_every_field_has_a_strategy():
    assert set(CompletionRequest.model_fields) <= set(COMPLETION)
    assert set(ChatRequest.model_fields) <= set(CHAT)
    assert set(StreamOptions.model_fields) == {"include_usage"}
    assert set(ChatMessage.model_fields) == {"role", "content"} and set(TextPart.model_fields) == {"type", "text"}


@DEFAULT
@given(doc=body(COMPLETION, "prompt"), how=ENCODING)
def test_fuzzed_completions(server, doc, how):
    fuzz(server, "/completions", doc, how)


@settings(DEFAULT, max_examples=200)  # more of them reach the engine: ~30 s
@given(doc=body(CHAT, "messages"), how=ENCODING)
def test_fuzzed_chat_completions(server, doc, how):
    fuzz(server, "/chat/completions", doc, how)


@settings(DEFAULT, max_examples=60)
@given(content=RAW_BYTES, path=st.sampled_from(["/completions", "/chat/completions"]))
def test_random_bytes(server, content, path):
    check(post(server, path, content), content)


@pytest.mark.slow
@MANY
@given(doc=body(COMPLETION, "prompt"), how=ENCODING)
def test_many_fuzzed_completions(server, doc, how):
    fuzz(server, "/completions", doc, how)


@pytest.mark.slow
@MANY
@given(doc=body(CHAT, "messages"), how=ENCODING)
def test_many_fuzzed_chat_completions(server, doc, how):
    fuzz(server, "/chat/completions", doc, how)


def test_healthy_and_idle_afterwards(server):
    _check_healthy(server)


def test_a_16_mb_list_is_refused_before_validation():
    """A 16 MB list of token ids took ~10 s of the event loop to validate; sizes are checked first now."""
    raw = json.dumps({"prompt": [5] * 5_500_000}).encode()
    start = time.perf_counter()
    with pytest.raises(ApiError, match=r"prompt has 5500000 items; no valid request has more than 64") as e:
        parse_body(raw, CompletionRequest, 2**24, max_items=64, max_keys=1000)
    assert e.value.status == 400 and e.value.param == "prompt"
    assert time.perf_counter() - start < 3  # json.loads itself: ~0.5 s
    with pytest.raises(ApiError, match=r"logit_bias has 1001 keys") as e:
        parse_body(json.dumps({"prompt": "x", "logit_bias": {str(i): 1 for i in range(1001)}}).encode(),
                   CompletionRequest, 2**24, max_items=64, max_keys=1000)
    with pytest.raises(ApiError, match=r"messages\.0\.content has 65 items") as e:
        parse_body(json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 65}]})
                   .encode(), ChatRequest, 2**24, max_items=64, max_keys=1000)
    assert e.value.param == "messages"
    ok = parse_body(json.dumps({"prompt": [[1] * 63] * 64}).encode(), CompletionRequest, 2**24, 64, 1000)
    assert len(ok.prompt) == 64


@pytest.mark.parametrize("raw", [b'{"prompt": "\\ud800"}', '{"prompt": "a\ud800b"}'.encode("utf-8", "surrogatepass"),
                                 '{"prompt": "\ud800\udfff"}'.encode("utf-8", "surrogatepass")])
def test_surrogates_escaped_or_raw_are_a_400(raw):
    """json.loads decodes bytes with "surrogatepass": raw UTF-8-encoded surrogates (invalid UTF-8) reach the
    strings as surrogates, as escapes do (the fuzz test found the raw case answered 500)."""
    with pytest.raises(ApiError, match="lone UTF-16 surrogate") as err:
        parse_body(raw, CompletionRequest, 1 << 20)
    assert err.value.status == 400 and err.value.param == "prompt"
