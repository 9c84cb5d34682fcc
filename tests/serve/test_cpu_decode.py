"""The fused C decode step (``serve.models.cpu_decode``) against the torch path it replaces: the same logits (to
float rounding), the same greedy tokens over whole generations, the same routing decisions for the routing
statistics; and the models it does not compute exactly are named and left to torch."""

from __future__ import annotations

import pytest
import torch

from quant import quantize_fp8
from routing.stats import RoutingStats
from serve import LLM, SamplingParams
from serve.engine.config import DEFAULT_MODEL
from serve.models import cpu_decode
from serve.models.cpu_decode import unsupported
from serve.models.loader import load_model
from tests.serve.checkpoints import hf_model, save

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
PROMPTS = [list(range(3, 50)), [9], list(range(90, 60, -1)), [5, 6, 7, 8]]

pytestmark = pytest.mark.skipif(cpu_decode._library() is None, reason="needs a C compiler and AVX2")


def _engines(path, **options):
    fused = LLM(path, attention_backend="cpu", block_size=8, **options)
    torch_path = LLM(path, attention_backend="torch", block_size=8, **options)
    return fused, torch_path


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "default"])
@pytest.mark.parametrize("threads", [1, 2])
def test_same_tokens_and_routing_as_the_torch_path(family, threads, tmp_path):
    """Mixtral (renormalised top-2), Qwen3-MoE (per-head q/k norms, a dense layer) and the default model (tied
    embeddings, 4096 logits: the threaded GEMV), greedy over decode steps of 1-4 sequences."""
    path = None if family == "default" else save(hf_model(family), tmp_path)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fused, reference = _engines(path)
        assert fused.engine.runner.fused is not None and reference.engine.runner.fused is None
        stats = [RoutingStats.attach(llm.engine.model, window=10) for llm in (fused, reference)]
        outputs = [llm.generate(PROMPTS, GREEDY) for llm in (fused, reference)]
    finally:
        torch.set_num_threads(saved)
    assert [o.token_ids for o in outputs[0]] == [o.token_ids for o in outputs[1]]
    assert torch.equal(stats[0].cumulative_counts(), stats[1].cumulative_counts())
    assert int(stats[0].cumulative_counts().sum()) > 0


def test_logits_of_one_decode_step_match(tmp_path):
    path = save(hf_model("qwen3_moe"), tmp_path)
    fused, reference = _engines(path, async_scheduling=False)  # one step at a time: the last one is made by hand
    for llm in (fused, reference):
        for i, prompt in enumerate(PROMPTS):
            llm.engine.add_request(str(i), prompt, GREEDY)
        while any(s.num_computed < s.num_prompt_tokens for s in llm.engine.scheduler.running) \
                or llm.engine.scheduler.waiting:
            llm.engine.step()
    logits = []
    for llm in (fused, reference):
        runner, batch = llm.engine.runner, llm.engine.scheduler.schedule()
        assert all(n == 1 for n in batch.num_new_tokens) and len(batch.seqs) == 4
        logits.append(runner.forward(runner.prepare(batch.seqs, batch.num_new_tokens), []))
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family, reason", [("mixtral_sliding", "attention windows or sinks"),
                                            ("gpt_oss", "attention biases or clipping"), ("olmoe", "q/k norm full"),
                                            ("qwen2_moe", "attention biases"), ("llama4", "q/k norm l2")])
def test_models_it_does_not_compute_are_named(family, reason, tmp_path):
    model = load_model(save(hf_model(family), tmp_path))
    llm = LLM(str(tmp_path), attention_backend="cpu", block_size=8)
    assert reason in unsupported(model, llm.engine.runner.cache) and llm.engine.runner.fused is None


def test_fp8_experts_are_left_to_torch():
    model = load_model(DEFAULT_MODEL)
    quantize_fp8(model, "block")
    llm = LLM(None, attention_backend="cpu")
    assert "an MoE layer other than" in unsupported(model, llm.engine.runner.cache)


def test_a_model_changed_after_the_engine_was_built_is_noticed(tmp_path):
    """Expert parallelism shards an engine's model after it is built: the step built on the old experts must not
    run on (the runner rebuilds it, or leaves the step to torch when the model no longer qualifies)."""
    from all_to_all.dispatcher import LocalDispatcher

    llm = LLM(None, attention_backend="cpu")
    runner = llm.engine.runner
    assert runner.fused.current()
    layer = llm.engine.model.layers[0].mlp
    layer.dispatcher = LocalDispatcher(layer.config.num_experts)  # a new object: as sharding leaves it
    assert not runner.fused.current()
    expected = LLM(None, attention_backend="torch").generate([[5, 6, 7]], GREEDY)[0].token_ids
    assert llm.generate([[5, 6, 7]], GREEDY)[0].token_ids == expected
    assert runner.fused is not None and runner.fused.current()  # rebuilt: a LocalDispatcher still qualifies
    layer.dispatcher = object()  # another dispatcher (an expert-parallel one): not computed here
    assert unsupported(llm.engine.model, runner.cache) == "expert parallelism"
