"""Issue 19, what a vLLM dashboard reads, on the real server (``benchmarks.server.running_server``): ``/metrics``
under vLLM's names, labels, types and buckets with values that add up to the requests sent (and spelled as vLLM
0.32 spells them where vLLM is installed next to us), and vLLM's ``/tokenize``, ``/detokenize`` and ``/version``
checked against the ``transformers`` tokenizer of the default model."""

from __future__ import annotations

import ast
import glob
import importlib.util
import json
import math
import os
from importlib import metadata
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from benchmarks.server import running_server
from serve.engine.config import DEFAULT_MODEL
from serve.engine.tokenizer import Tokenizer
from serve.http import metrics

MODEL = "moe-serve-default"
KEY = "sesame"
MAX_LEN, MAX_BYTES = 256, 65536
OVERRIDES = ("engine.max_num_seqs=8", "engine.max_num_batched_tokens=256", f"model.max_model_len={MAX_LEN}",
             f"server.api_key={KEY}", f"server.max_request_bytes={MAX_BYTES}")
EOS = 2  # <|im_end|>, the default model's first eos_token_id
VLLM_GLOB = os.path.expanduser("~/peers/vllm/lib/python*/site-packages/vllm/v1/metrics")
TYPES = {
    "gauge": ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
              "moe_serve_kv_cache_free_blocks", "moe_serve_kv_cache_blocks"],
    "counter": ["vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:num_preemptions", "vllm:prompt_tokens",
                "vllm:prompt_tokens_by_source", "vllm:prompt_tokens_cached", "vllm:generation_tokens",
                "vllm:request_success", "vllm:admission_rejections", "moe_serve_expert_tokens"],
    "histogram": ["vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                  "vllm:request_time_per_output_token_seconds", "vllm:e2e_request_latency_seconds",
                  "vllm:request_queue_time_seconds", "vllm:request_inference_time_seconds",
                  "vllm:request_prefill_time_seconds", "vllm:request_decode_time_seconds",
                  "vllm:request_prompt_tokens", "vllm:request_generation_tokens", "vllm:iteration_tokens_total",
                  "vllm:request_max_num_generation_tokens", "vllm:request_params_n", "vllm:request_params_max_tokens",
                  "vllm:request_num_preemptions", "vllm:request_prefill_kv_computed_tokens"],
}


@pytest.fixture(scope="module")
def server():
    with running_server(*OVERRIDES) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def hf():
    return AutoTokenizer.from_pretrained(str(DEFAULT_MODEL))


def _families(http) -> dict:
    return {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)
            if not f.name.endswith("_created")}


def _samples(http) -> dict:
    return {(s.name, frozenset(s.labels.items())): s.value for f in _families(http).values() for s in f.samples}


def _total(samples: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls)


def _complete(http, **body) -> dict:
    r = http.post("/v1/completions", json={"model": MODEL, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


# -- /metrics ------------------------------------------------------------------------------------------------------
def test_metrics_add_up_to_the_requests_sent(server, http, hf):
    before = _samples(http)
    a = [1000 + 7 * i for i in range(7)]
    b = [1500 + 11 * i for i in range(37)]  # two full blocks of 16: the second of n=2 choices takes them cached
    c = [900 + 5 * i for i in range(4)]
    _complete(http, prompt=a, max_tokens=5, ignore_eos=True)
    out_b = _complete(http, prompt=b, max_tokens=3, n=2, ignore_eos=True, temperature=0.8, seed=3)
    out_c = _complete(http, prompt=c, max_tokens=6, logit_bias={str(EOS): 100})  # EOS first: "stop" after 1
    assert [ch["finish_reason"] for ch in out_b["choices"] + out_c["choices"]] == ["length", "length", "stop"]
    chat = [{"role": "user", "content": "Sort a list"}]
    with http.stream("POST", "/v1/chat/completions", json={
            "model": MODEL, "messages": chat, "max_tokens": 4, "ignore_eos": True, "stream": True}) as r:
        assert r.status_code == 200
        assert [line for line in r.iter_lines() if line.startswith("data: ")][-1] == "data: [DONE]"
    d_len = len(hf(hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=False),
                   add_special_tokens=False).input_ids)
    server.wait_idle()
    after = _samples(http)

    def delta(name, **labels):
        return _total(after, name, **labels) - _total(before, name, **labels)

    # sub-requests: a (5 tokens), b x 2 (3 each), c (1), d (4); prompts counted per sub-request, as vLLM does
    subs, generated, prompt = 5, 5 + 3 + 3 + 1 + 4, 7 + 2 * 37 + 4 + d_len
    assert delta("vllm:request_success_total", finished_reason="length") == 4
    assert delta("vllm:request_success_total", finished_reason="stop") == 1
    assert delta("vllm:request_success_total", finished_reason="abort") == 0
    assert delta("vllm:prompt_tokens_total") == prompt
    assert delta("vllm:generation_tokens_total") == generated
    assert delta("vllm:prompt_tokens_cached_total") == 32
    assert delta("vllm:prompt_tokens_by_source_total", source="local_cache_hit") == 32
    assert delta("vllm:prompt_tokens_by_source_total", source="local_compute") == prompt - 32
    assert delta("vllm:prefix_cache_hits_total") >= 32 and delta("vllm:prefix_cache_queries_total") >= prompt
    # the tokens of every step: the prompt tokens computed plus those sampled
    assert delta("vllm:iteration_tokens_total_sum") == prompt - 32 + generated
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                 "request_prefill_time_seconds", "request_decode_time_seconds", "request_inference_time_seconds",
                 "request_time_per_output_token_seconds", "request_prompt_tokens", "request_generation_tokens",
                 "request_num_preemptions", "request_prefill_kv_computed_tokens", "request_params_max_tokens"):
        assert delta(f"vllm:{name}_count") == subs, name
    assert delta("vllm:inter_token_latency_seconds_count") == generated - subs  # all tokens but each first
    assert delta("vllm:request_prompt_tokens_sum") == prompt
    assert delta("vllm:request_generation_tokens_sum") == generated
    assert delta("vllm:request_prefill_kv_computed_tokens_sum") == prompt - 32
    assert delta("vllm:request_num_preemptions_sum") == 0
    assert delta("vllm:request_params_max_tokens_sum") == 5 + 2 * 3 + 6 + 4
    assert delta("vllm:request_params_n_count") == 4 and delta("vllm:request_params_n_sum") == 1 + 2 + 1 + 1
    assert delta("vllm:request_max_num_generation_tokens_sum") == 5 + 3 + 1 + 4
    # the phases of each request add up: inference = prefill + decode, e2e = ttft + decode, ttft >= queue + prefill
    ttft, e2e, queue, prefill, decode, inference = (delta(f"vllm:{n}_sum") for n in (
        "time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
        "request_prefill_time_seconds", "request_decode_time_seconds", "request_inference_time_seconds"))
    assert min(ttft, queue, prefill, decode) >= 0 and ttft > 0 and decode > 0
    assert math.isclose(inference, prefill + decode, abs_tol=1e-6)
    assert math.isclose(e2e, ttft + decode, abs_tol=1e-6)
    assert ttft >= queue + prefill - 1e-6
    idle = _samples(http)
    assert _total(idle, "vllm:num_requests_running") == 0 and _total(idle, "vllm:num_requests_waiting") == 0
    assert _total(idle, "vllm:kv_cache_usage_perc") == 0
    assert _total(idle, "moe_serve_kv_cache_blocks") == _total(idle, "moe_serve_kv_cache_free_blocks") > 0


def test_every_series_has_model_name_the_type_and_vllms_buckets(http):
    families = _families(http)
    for kind, names in TYPES.items():
        for name in names:
            assert families[name].type == kind, name
    ours = [f for name, f in families.items() if name.startswith(("vllm:", "moe_serve_"))]
    assert len(ours) == sum(map(len, TYPES.values()))  # no series outside the table above
    for family in ours:
        assert family.samples, family.name
        for sample in family.samples:
            assert sample.labels["model_name"] == MODEL, sample
            if family.name.startswith("vllm:") and family.name != "vllm:admission_rejections":
                assert sample.labels["engine"] == "0", sample
    reasons = {s.labels["finished_reason"] for s in families["vllm:request_success"].samples}
    assert reasons == {"stop", "length", "abort", "error", "repetition"}

    def bounds(name):
        return [float(s.labels["le"]) for s in families[name].samples if s.name.endswith("_bucket")]

    assert bounds("vllm:time_to_first_token_seconds") == [*metrics.TIME_TO_FIRST_TOKEN_BUCKETS, math.inf]
    assert bounds("vllm:inter_token_latency_seconds") == [*metrics.INTER_TOKEN_LATENCY_BUCKETS, math.inf]
    assert bounds("vllm:e2e_request_latency_seconds") == [*metrics.REQUEST_LATENCY_BUCKETS, math.inf]
    assert bounds("vllm:request_prompt_tokens") == [1, 2, 5, 10, 20, 50, 100, 200, math.inf]  # 1-2-5 to 256


def _vllm_source() -> Path:
    found = sorted(glob.glob(VLLM_GLOB))
    if not found:
        pytest.skip(f"vLLM is not installed at {VLLM_GLOB}")
    return Path(found[-1])


def _vllm_metrics(loggers: Path) -> dict[str, tuple]:
    """``name -> (type, help, label names)`` of every ``self._<type>_cls(name="vllm:...", ...)`` in loggers.py."""
    tree = ast.parse(loggers.read_text())
    base = next(ast.literal_eval(node.value) for node in ast.walk(tree) if isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "labelnames" for t in node.targets))
    found = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        kw = {k.arg: k.value for k in node.keywords}
        name = kw.get("name")
        if not (isinstance(name, ast.Constant) and str(name.value).startswith("vllm:")):
            continue
        labels = kw.get("labelnames")
        try:
            if isinstance(labels, ast.Name):
                names: tuple[str, ...] | None = tuple(base)
            elif isinstance(labels, ast.BinOp):
                names = (*base, *ast.literal_eval(labels.right))
            else:
                names = tuple(ast.literal_eval(labels)) if labels is not None else ()
            doc = ast.literal_eval(kw["documentation"])
        except ValueError:  # built from variables (vllm:lora_requests_info): not one we export
            names = doc = None
        kind = node.func.attr.strip("_").removesuffix("_cls")
        found[name.value] = (kind, doc, names)
    return found


def test_names_help_labels_and_buckets_are_spelled_as_vllm_spells_them(http):
    source = _vllm_source()
    theirs = _vllm_metrics(source / "loggers.py")
    assert "vllm:num_requests_running" in theirs and len(theirs) > 30  # the parse found vLLM's metrics
    families = _families(http)
    ours = {name: f for name, f in families.items() if name.startswith("vllm:")}
    assert len(ours) >= 25
    for name, family in ours.items():
        assert name in theirs, f"{name} is not a vLLM metric"
        kind, doc, labels = theirs[name]
        assert family.type == kind, name
        assert family.documentation == doc, name
        ours_labels = {k for s in family.samples for k in s.labels if k != "le"}
        assert ours_labels == set(labels), name
    spec = importlib.util.spec_from_file_location("vllm_buckets", source / "buckets.py")
    buckets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(buckets)  # standalone: it imports only collections.abc and typing
    for family in ("REQUEST_LATENCY", "TIME_TO_FIRST_TOKEN", "INTER_TOKEN_LATENCY", "ITERATION_TOKENS",
                   "REQUEST_PARAMS_N", "REQUEST_NUM_PREEMPTIONS"):
        assert tuple(getattr(metrics, family + "_BUCKETS")) == tuple(getattr(buckets, family + "_BUCKETS")), family
    assert metrics.request_tokens_buckets(MAX_LEN) == buckets.build_1_2_5_buckets(MAX_LEN)
    assert metrics.FINISH_REASONS == _vllm_finish_reasons(source.parents[1])


def _vllm_finish_reasons(vllm: Path) -> tuple[str, ...]:
    tree = ast.parse((vllm / "v1" / "engine" / "__init__.py").read_text())
    return next(ast.literal_eval(node.value) for node in ast.walk(tree) if isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "FINISH_REASON_STRINGS" for t in node.targets))


# -- /tokenize, /detokenize, /version ------------------------------------------------------------------------------
PROMPT = "def fibonacci(n):\n    return n"


def test_tokenize_a_prompt_as_transformers_does(http, hf):
    for special in (True, False):
        r = http.post("/tokenize", json={"model": MODEL, "prompt": PROMPT, "add_special_tokens": special})
        assert r.status_code == 200, r.text
        ids = hf(PROMPT, add_special_tokens=special).input_ids
        assert r.json() == {"count": len(ids), "max_model_len": MAX_LEN, "tokens": ids}
    strs = http.post("/tokenize", json={"prompt": PROMPT, "return_token_strs": True}).json()
    assert strs["token_strs"] == hf.convert_ids_to_tokens(strs["tokens"])


def test_tokenize_messages_with_the_chat_template(http, hf):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort a list"}]
    answers = []
    for generation_prompt in (True, False):
        text = hf.apply_chat_template(chat, add_generation_prompt=generation_prompt, tokenize=False)
        ids = hf(text, add_special_tokens=False).input_ids
        r = http.post("/tokenize", json={"model": MODEL, "messages": chat,
                                         "add_generation_prompt": generation_prompt})
        assert r.status_code == 200, r.text
        assert r.json() == {"count": len(ids), "max_model_len": MAX_LEN, "tokens": ids}
        answers.append(ids)
    assert len(answers[0]) > len(answers[1])  # the generation prompt is there only when asked for


def test_detokenize_round_trips_and_keeps_special_tokens(http, hf):
    ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    r = http.post("/detokenize", json={"model": MODEL, "tokens": ids})
    assert r.status_code == 200 and r.json() == {"prompt": PROMPT} and hf.decode(ids) == PROMPT
    with_eos = [*ids, EOS]
    assert http.post("/detokenize", json={"tokens": with_eos}).json() == {"prompt": hf.decode(with_eos)}
    assert hf.decode(with_eos).endswith("<|im_end|>")
    assert http.post("/detokenize", json={"tokens": []}).json() == {"prompt": ""}


def test_version_is_the_package_version(http):
    r = http.get("/version")
    assert r.status_code == 200 and r.json() == {"version": metadata.version("moe-serve")}


def _error(r, status: int, param: str | None) -> str:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error
    return error["message"]


def test_bad_tokenize_and_detokenize_bodies_are_4xx_naming_the_field(http):
    vocab = 4096
    assert "4096" in _error(http.post("/detokenize", json={"tokens": [5, vocab]}), 400, "tokens")
    assert "-1" in _error(http.post("/detokenize", json={"tokens": [-1]}), 400, "tokens")
    _error(http.post("/detokenize", json={"tokens": ["5"]}), 400, "tokens.0")  # strict: a string is not an id
    _error(http.post("/detokenize", json={}), 400, "tokens")
    # bounded before validation, as on the completion endpoints: no sequence holds more ids than the context
    bound = max(http.post("/tokenize", json={"prompt": "x"}).json()["max_model_len"], 256)
    assert "no valid request" in _error(http.post("/detokenize", json={"tokens": [5] * (bound + 1)}), 400, "tokens")
    _error(http.post("/detokenize", json={"model": "gpt-4", "tokens": [1]}), 404, "model")
    _error(http.post("/tokenize", json={"model": "gpt-4", "prompt": "x"}), 404, "model")
    _error(http.post("/tokenize", json={"prompt": 5}), 400, "prompt")
    _error(http.post("/tokenize", json={}), 400, "prompt")
    _error(http.post("/tokenize", json={"prompt": "x", "messages": [{"role": "user", "content": "x"}]}), 400,
           "messages")
    _error(http.post("/tokenize", json={"messages": []}), 400, "messages")
    _error(http.post("/tokenize", json={"messages": [{"role": "robot", "content": "x"}]}), 400, "messages.0.role")
    _error(http.post("/tokenize", json={"messages": [{"role": "user", "content": "x"}],
                                        "continue_final_message": True}), 400, "continue_final_message")
    _error(http.post("/tokenize", json={"messages": [{"role": "user", "content": "x"}],
                                        "chat_template_kwargs": {"messages": 1}}), 400, "messages")
    _error(http.post("/tokenize", content=b"{not json", headers={"content-type": "application/json"}), 400, None)
    _error(http.post("/tokenize", content=json.dumps({"prompt": "a\ud800"}),
                     headers={"content-type": "application/json"}), 400, "prompt")
    _error(http.post("/tokenize", json={"prompt": "x" * MAX_BYTES}), 413, None)
    too_long = "x" * (Tokenizer(DEFAULT_MODEL).max_token_chars * MAX_LEN)  # at least max_model_len tokens
    assert "max_model_len" in _error(http.post("/tokenize", json={"prompt": too_long}), 400, "prompt")


def test_the_three_endpoints_need_the_api_key(server):
    for method, path in (("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/version")):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.request(method, server.url + path, json={"prompt": "x", "tokens": [1]}, headers=headers)
            assert _error(r, 401, "Authorization") and r.headers["www-authenticate"] == "Bearer"
