"""Start-up: the engine's warm-up builds the C kernels and leaves no trace; ``moe-serve`` logs one summary line."""

from __future__ import annotations

import re

import pytest

from moe.kernels import cpu_gemm
from serve import LLM, SamplingParams
from serve.launch.schema import to_config
from serve.launch.serving import startup_summary
from serve.models import cpu_attention, cpu_decode
from tests.serve.test_configs import composed

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
PROMPTS = [[5, 6, 7, 8] * 9, [9, 10, 11]]


def test_warm_up_leaves_no_blocks_cache_entries_requests_or_statistics():
    warm = LLM(block_size=8)
    engine = warm.engine
    assert engine.warm_up() > 0
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert engine.blocks.cached == {} and engine.blocks.enable_prefix_caching
    assert not engine.requests and engine.stats.steps == 0
    got = [o.token_ids for o in warm.generate(PROMPTS, GREEDY)]
    assert got == [o.token_ids for o in LLM(block_size=8).generate(PROMPTS, GREEDY)]
    assert warm.generate(PROMPTS[:1], GREEDY)[0].num_cached_tokens == 32  # the prefix cache still works


def test_warm_up_builds_the_kernels_before_the_first_request(tmp_path, monkeypatch):
    """On a machine's first start (an empty kernel cache) the libraries are compiled by the warm-up, not by
    a client's first request."""
    if not cpu_gemm.skinny_gemm_available():
        pytest.skip("no C compiler or no AVX2 here: the torch paths need no build")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    llm = LLM()
    loaders = (cpu_gemm._library, cpu_gemm._block_library, cpu_attention._library, cpu_decode._library)
    for loader in loaders:
        loader.cache_clear()
    try:
        llm.engine.warm_up()
        built = sorted(p.name.split("-")[0] for p in (tmp_path / "moe-serve").glob("*.so"))
        assert built == ["block_gemm", "decode_step", "paged_attention", "skinny_gemm"]
    finally:
        for loader in loaders:
            loader.cache_clear()  # the next use loads the per-user cache's copy again


def test_startup_summary_names_model_device_dtype_quantization_cache_and_times():
    cfg = to_config(composed())
    llm = LLM()
    line = startup_summary(cfg, llm.engine, 1.25, 0.5)
    blocks = llm.engine.blocks.num_blocks
    assert re.fullmatch(rf"moe-serve-default \(\w+, \d+ layers\): float32 on cpu, quantization none, attention \w+, "
                        rf"KV cache {blocks} blocks x 16 tokens, max_model_len \d+; loaded in 1\.2 s, warmed up in "
                        r"0\.5 s", line), line
