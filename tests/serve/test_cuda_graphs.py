"""The decode-graph runner's padding, buckets and persistent buffers, on any device.

A CUDA graph replays recorded kernels over the buffers it was captured with. ``ReplayedCall`` stands in for it
on the CPU: it keeps the captured function and reruns it on replay, writing into the output buffer of the
capture. What it checks is what can go wrong around a graph: the padding rows (null block and slot), the
buffer copies, bucket choice, and that the real sequences' K/V are unchanged by the padding.
"""

from __future__ import annotations

import pytest
import torch

from serve import LLM, SamplingParams
from serve.engine.cuda_graphs import graph_batch_sizes
from serve.engine.model_runner import ModelRunner
from serve.models.cpu_attention import paged_decode_available
from serve.models.triton_attention import triton_attention_available
from tests.serve.checkpoints import hf_model, save


class ReplayedCall:
    captures = 0
    replays = 0

    def capture(self, fn):
        ReplayedCall.captures += 1
        self.fn = fn
        self.out = fn()
        return self.out

    def replay(self) -> None:
        ReplayedCall.replays += 1
        self.out.copy_(self.fn())


def test_graph_batch_sizes():
    assert graph_batch_sizes(48) == [1, 2, 4, 8, 16, 32, 64]
    assert graph_batch_sizes(8) == [1, 2, 4, 8]
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(1000)[-1] == 256


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save(hf_model("mixtral"), tmp_path_factory.mktemp("mixtral"))


def _llm(path, graphs: bool, backend: str = "auto") -> LLM:
    llm = LLM(path, max_num_seqs=8, max_num_batched_tokens=64, num_kv_blocks=64, max_model_len=80,
              attention_backend=backend)
    if graphs:  # the same runner with the stand-in graphs, captured at start as the engine does on CUDA
        old = llm.engine.runner
        llm.engine.runner = ModelRunner(old.model, old.cache.null_block, old.block_size, attention_backend=backend,
                                        cuda_graphs=True, max_num_seqs=8, max_model_len=llm.engine.max_model_len,
                                        graph_factory=ReplayedCall)
        llm.engine.runner.capture_graphs()
    return llm


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_graph_replays_match_eager_decoding(checkpoint, backend):
    """Batches of 3, 5 and 8 decoding sequences (padded to 4, 8, 8), mixed lengths, prompts sharing a block:
    the same greedy tokens as the eager runner, decoded from replays."""
    if backend == "cpu" and not paged_decode_available(torch.zeros(1)):
        pytest.skip("no C compiler / AVX2 for the paged decode kernel")
    if backend == "triton" and not triton_attention_available(torch.zeros(1)):
        pytest.skip("needs Triton on CUDA or its interpreter (TRITON_INTERPRET=1)")
    prompts = [[(7 * i + j) % 128 for j in range(n)] for i, n in enumerate([3, 17, 40, 5, 16, 33, 9, 21])]
    prompts[1] = prompts[4] + [1]  # a shared full block (prefix cache)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    expected = [o.token_ids for o in _llm(checkpoint, False, backend).generate(prompts, params)]
    ReplayedCall.captures = ReplayedCall.replays = 0
    llm = _llm(checkpoint, True, backend)
    assert ReplayedCall.captures == 4  # sizes 1, 2, 4, 8 captured at start
    for batch in (prompts[:3], prompts[3:8], prompts):
        got = [o.token_ids for o in llm.generate(batch, params)]
        assert got == [expected[prompts.index(p)] for p in batch]
    assert ReplayedCall.replays >= 3 * 11  # every decode step after the prefill was a replay
    assert ReplayedCall.captures == 4


def test_padding_rows_write_only_the_null_block(checkpoint):
    llm = _llm(checkpoint, True, "torch")
    runner = llm.engine.runner
    null = runner.cache.null_block
    llm.generate([[1, 2, 3], [4, 5, 6, 7, 8]], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    before = runner.cache.pool.clone()
    seqs = list(llm.engine.requests.values())
    assert not seqs  # finished: their blocks are free, their K/V stay
    inputs = runner.prepare([], [])  # an empty step is not decode-only: eager
    assert runner.graphs.size_for(inputs) is None
    # a fresh 3-sequence batch decodes padded to 4: afterwards only blocks of the batch and the null block (token
    # 0 at position 0, as when the graphs were captured) may differ from before
    llm.engine.add_request("a", [9, 9, 9], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    llm.engine.add_request("b", [8, 8], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    llm.engine.add_request("c", [7], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    used, replays = set(), ReplayedCall.replays
    while llm.engine.has_unfinished_requests():
        used |= {b for s in llm.engine.requests.values() for b in s.block_table}
        llm.engine.step()
    changed = {int(b) for b in (runner.cache.pool != before).flatten(0, 2).any(-1).any(-1).any(0).nonzero()}
    assert ReplayedCall.replays - replays == 2 and used and changed - used <= {null}
    assert runner.cache.pool[:, :, :, null].abs().sum() > 0  # the padding did write there


def test_routing_statistics_count_no_padding_rows_and_attaching_them_recaptures(checkpoint):
    """3 sequences decode padded to 4: the routing counts equal the eager runner's, so the padding row is not
    counted; attaching the statistics after start-up makes the runner capture again (a CUDA graph would keep
    calling the observers of its capture)."""
    from routing import RoutingStats

    prompts = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7, 9]]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    counts = []
    for graphs in (False, True):
        llm = _llm(checkpoint, graphs, "torch")
        captures = ReplayedCall.captures
        stats = RoutingStats.attach(llm.engine.model)
        llm.generate(prompts, params)
        counts.append(stats.cumulative_counts())
        if graphs:
            assert ReplayedCall.captures > captures  # captured again for the new observers
    torch.testing.assert_close(counts[1], counts[0], rtol=0, atol=0)
    tokens = 5 + 3 + 7 + 3 * 5  # the prompts, then 5 decode steps each (the 6th token is not fed back)
    assert int(counts[0].sum()) == 2 * 2 * tokens  # 2 layers, top-2: every real token, no padding row
