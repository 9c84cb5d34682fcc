"""Issue 19, structured output: ``response_format`` json_schema / json_object through llguidance's token masks.

The issue's check (100% of 50 outputs sampled at temperature 1 parse and validate against the schema, on the
default model), json_object outputs parse, the grammar ends a sequence even with ``ignore_eos``, a mixed batch
leaves the unconstrained requests token-identical, the mask matches llguidance's own reference, and through the
real server (the official client): chat and completions, streamed and not, and an invalid schema is a 400 naming
``response_format``.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import llguidance.numpy as llg_numpy
import numpy as np
import openai
import pytest
import torch

from benchmarks.server import running_server
from serve import LLM, SamplingParams
from serve.engine.structured import GrammarMasker

PROMPT = "def fibonacci(n):"
# bounded strings, numbers and arrays: every path through the grammar ends, so a sampled output always finishes
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "score": {"type": "number"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "address", "active"],
    "additionalProperties": False,
}
OVERRIDES = ("engine.max_num_seqs=8", "engine.max_num_batched_tokens=256", "model.max_model_len=512")


@pytest.fixture(scope="module")
def llm():
    return LLM(max_num_seqs=16, max_num_batched_tokens=256, max_model_len=512)


def _schema_params(seed: int, schema: dict = SCHEMA, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=300, temperature=1.0, seed=seed, json_schema=schema, **kw)


def test_fifty_sampled_outputs_validate_against_the_schema(llm):
    outs = llm.generate([PROMPT] * 50, [_schema_params(seed) for seed in range(50)])
    for out in outs:
        assert out.finish_reason == "stop", (out.finish_reason, out.text)  # none ran into max_tokens
        jsonschema.validate(json.loads(out.text), SCHEMA)
    assert len({out.text for out in outs}) > 40  # sampled, not one forced answer


def test_json_object_outputs_parse(llm):
    outs = llm.generate(["hello"] * 10, [_schema_params(seed, {"type": "object"}) for seed in range(10)])
    finished = [out for out in outs if out.finish_reason == "stop"]
    assert len(finished) >= 5, [(o.finish_reason, len(o.token_ids)) for o in outs]  # any object is unbounded
    for out in finished:
        assert isinstance(json.loads(out.text), dict), out.text
    for out in outs:  # a truncated one is still a prefix of JSON: it starts as an object does
        assert out.text.startswith("{")


def test_a_complete_grammar_ends_the_sequence_even_with_ignore_eos(llm):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    out = llm.generate(PROMPT, _schema_params(3, schema, ignore_eos=True))[0]
    assert out.finish_reason == "stop" and json.loads(out.text) in ({"ok": True}, {"ok": False}), out.text


def test_unconstrained_requests_are_token_identical_in_a_mixed_batch(llm):
    free = [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
            SamplingParams(max_tokens=24, temperature=0.8, seed=11, ignore_eos=True)]
    alone = [out.token_ids for out in llm.generate([PROMPT, "import os\n"], free)]
    constrained = [_schema_params(seed) for seed in range(4)]
    mixed = llm.generate([PROMPT, "import os\n"] + [PROMPT] * 4, free + constrained)
    assert [out.token_ids for out in mixed[:2]] == alone
    for out in mixed[2:]:
        jsonschema.validate(json.loads(out.text), SCHEMA)


def test_an_invalid_schema_is_refused_before_anything_is_queued(llm):
    with pytest.raises(ValueError, match=r"^json_schema .* not a valid JSON schema: Invalid type: nonsense"):
        llm.generate(PROMPT, SamplingParams(json_schema={"type": "nonsense"}))
    assert not llm.engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="json_schema"):
        SamplingParams(json_schema="not a dict")


def test_schemas_compile_once(llm):
    grammars = llm.engine.grammars
    first = grammars.compile({"type": "array", "maxItems": 2})
    assert grammars.compile({"maxItems": 2, "type": "array"}) is first  # keyed by the schema, not its spelling
    assert grammars.matcher({"type": "array", "maxItems": 2}) is not first  # each sequence gets its own copy


@pytest.mark.parametrize("B, rows", [(1, [0]), (5, [1, 4]), (3, [0, 1, 2])])
def test_the_mask_matches_llguidances_reference_and_leaves_other_rows_alone(llm, B, rows):
    V = llm.engine.model.config.vocab_size
    matchers = [llm.engine.grammars.matcher(SCHEMA) for _ in rows]
    for matcher, prefix in zip(matchers, ['{"name":"a', '{"name":"', '{'], strict=False):
        assert matcher.consume_tokens(llm.tokenizer.encode(prefix, add_special_tokens=False))
    logits_BV = torch.randn(B, V)
    out_BV = GrammarMasker()(logits_BV, rows, matchers)
    expected = logits_BV.numpy().copy()
    for r, matcher in zip(rows, matchers, strict=True):
        mask = llg_numpy.allocate_token_bitmask(1, V)
        llg_numpy.fill_next_token_bitmask(matcher, mask)
        llg_numpy.apply_token_bitmask_inplace(expected[r:r + 1], mask)
    assert torch.equal(out_BV, torch.from_numpy(expected))
    assert all(0 < np.isfinite(expected[r]).sum() < V for r in rows)  # the mask did forbid, and allowed, something


# -- through the real server, the official client ----------------------------------------------------------------
@pytest.fixture(scope="module")
def server():
    with running_server(*OVERRIDES) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=60)


def _format(schema: dict = SCHEMA) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


def test_chat_json_schema_through_the_server(client):
    r = client.chat.completions.create(model="moe-serve-default", messages=[{"role": "user", "content": "hi"}],
                                       response_format=_format(), max_tokens=300, n=3, seed=1)
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    stream = client.chat.completions.create(model="moe-serve-default", messages=[{"role": "user", "content": "hi"}],
                                            response_format=_format(), max_tokens=300, seed=2, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_completions_json_object_through_the_server(server):
    body = {"prompt": "hello", "max_tokens": 300, "n": 4, "seed": 0, "response_format": {"type": "json_object"}}
    r = httpx.post(server.v1 + "/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    finished = [c["text"] for c in r.json()["choices"] if c["finish_reason"] == "stop"]
    assert finished and all(isinstance(json.loads(text), dict) for text in finished), r.json()["choices"]


@pytest.mark.parametrize("response_format, match", [
    (_format({"type": "object", "properties": {"a": {"type": "nonsense"}}}), "Invalid type: nonsense"),
    (_format({"type": "string", "pattern": "("}), "regex parse error"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "'schema' is a JSON schema object"),
    ({"type": "json_schema", "json_schema": {"name": "no spaces", "schema": {}}}, "name"),
    ({"type": "grammar"}, "must be 'text', 'json_object' or 'json_schema'"),
])
def test_an_invalid_response_format_is_a_400_naming_it(client, server, response_format, match):
    with pytest.raises(openai.BadRequestError, match=match) as caught:
        client.chat.completions.create(model="moe-serve-default", messages=[{"role": "user", "content": "hi"}],
                                       response_format=response_format, max_tokens=8)
    assert caught.value.body["param"] == "response_format"
    r = httpx.post(server.v1 + "/completions", json={"prompt": "x", "response_format": response_format}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text
    assert "\n" not in r.json()["error"]["message"]
