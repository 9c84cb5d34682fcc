"""The engine with the Triton attention backend (Triton's interpreter on the CPU) against the torch backend:
greedy tokens identical through chunked prefill next to decodes in one step, the prefix cache and preemption."""

from __future__ import annotations

import pytest
import torch

from serve import LLM, SamplingParams
from serve.models.triton_attention import triton_attention_available
from tests.serve.checkpoints import hf_model, save

pytestmark = pytest.mark.skipif(not triton_attention_available(torch.zeros(1)),
                                reason="needs Triton on CUDA or its interpreter (TRITON_INTERPRET=1)")


@pytest.fixture(scope="module", params=["qwen2_moe", "gpt_oss"])
def checkpoint(request, tmp_path_factory):
    """gpt-oss: a sliding window of 12 and attention sinks through the kernel, prompts longer than the window."""
    return save(hf_model(request.param), tmp_path_factory.mktemp(request.param))


def test_triton_attention_serves_the_same_tokens_as_torch(checkpoint):
    prompts = [[(5 * i + 3 * j) % 128 for j in range(n)] for i, n in enumerate([1, 23, 40, 16, 7, 33])]
    prompts[5] = prompts[2][:32] + [9]  # two full blocks from the prefix cache
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    # 24 tokens a step: the long prompts are chunked while the short ones already decode; 12 blocks of 16 for
    # six sequences of up to 50 tokens: some are preempted and recomputed
    options = dict(max_num_seqs=6, max_num_batched_tokens=24, num_kv_blocks=12, block_size=16, max_model_len=64)
    expected = LLM(checkpoint, attention_backend="torch", **options).generate(prompts, params)
    llm = LLM(checkpoint, attention_backend="triton", **options)
    got = llm.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    assert llm.engine.stats.steps > 10 and llm.engine.blocks.num_free_blocks == 12
    assert any(o.num_cached_tokens for o in got)
