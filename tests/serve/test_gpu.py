"""The engine on a CUDA GPU (``pytest -m gpu``; skipped without one): weights and KV cache on the device, greedy
parity with ``transformers`` on CUDA, CUDA graphs against eager decoding, Triton against torch attention, the KV
pool sized from free memory, and no host sync in a decode forward. The tests parametrized over ``DEVICES`` run
on the CPU everywhere and on the GPU where there is one (that variant is gpu-marked)."""

from __future__ import annotations

import copy
import gc
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from benchmarks.gpu_serve import (
    PARITY_TOKENS,
    bf16_faithful,
    fp32_argmax_rate,
    hf_greedy,
    identical,
    parity_prompts,
    scheduled_decode,
)
from serve import LLM, SamplingParams
from serve.models.attention import PagedKVCache
from tests.serve.checkpoints import FAMILIES, hf_model, save

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
GREEDY = SamplingParams(max_tokens=PARITY_TOKENS, temperature=0.0, ignore_eos=True)
SMALL = dict(num_kv_blocks=64, max_model_len=256, max_num_seqs=8)  # a small KV pool: tests share the GPU


def _free_cuda() -> None:
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    model = hf_model("mixtral")
    return save(model, tmp_path_factory.mktemp("mixtral")), model


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    model = hf_model(request.param)
    return request.param, save(model, tmp_path_factory.mktemp(request.param)), model


# -------------------------------------------------------------------------------------------- any device


@pytest.mark.parametrize("device", ["auto", *DEVICES])
def test_engine_serves_on_its_device(mixtral, device):
    path, model = mixtral
    expected_type = "cuda" if device == "cuda" or (device == "auto" and CUDA) else "cpu"
    llm = LLM(path, device=device, **SMALL)
    engine = llm.engine
    assert engine.device.type == expected_type
    assert {t.device.type for t in (*engine.model.parameters(), *engine.model.buffers())} == {expected_type}
    assert engine.runner.cache.pool.device.type == expected_type
    prompts = parity_prompts()[:3]
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == hf_greedy(model, prompts, PARITY_TOKENS)


def _rss_anon() -> int | None:
    """Anonymous resident bytes of this process (None where ``/proc`` does not say): what a host copy of the
    weights adds; the checkpoint's file pages, mapped by safetensors, are RssFile and do not count."""
    status = Path("/proc/self/status")
    lines = status.read_text().splitlines() if status.is_file() else []
    return next((int(line.split()[1]) * 1024 for line in lines if line.startswith("RssAnon:")), None)


class PeakRssAnon:
    """``with PeakRssAnon() as peak: ...``; ``peak.growth``: the largest ``_rss_anon()`` over the block (sampled
    every 2 ms by a thread, so a host copy freed before the block ends still shows) minus the one before it."""

    def __enter__(self) -> PeakRssAnon:
        self.before = self.peak = _rss_anon()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.done.wait(0.002):
            self.peak = max(self.peak, _rss_anon())

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, _rss_anon())
        self.growth = self.peak - self.before


@pytest.mark.skipif(_rss_anon() is None, reason="reads RssAnon from /proc/self/status (Linux)")
@pytest.mark.parametrize("device", DEVICES)
def test_loading_does_not_go_through_a_host_copy(mixtral, tmp_path, device):
    """A ~200 MB fp32 checkpoint (written by a subprocess, so that none of its memory is in this one): loading it
    onto the CPU grows anonymous RSS by about its size (the probe sees a host copy), onto the GPU by < 1/4 of it
    at any moment of the load."""
    script = ("import sys; from tests.serve.checkpoints import hf_model, save; save(hf_model('mixtral', "
              "hidden_size=512, intermediate_size=1024, num_hidden_layers=4), sys.argv[1])")
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, cwd=Path(__file__).parents[2],
                   capture_output=True)
    size = (tmp_path / "model.safetensors").stat().st_size
    LLM(mixtral[0], device=device, cuda_graphs=False, **SMALL).generate([[1, 2]])  # CUDA context, kernels, libs
    _free_cuda()
    with PeakRssAnon() as rss:
        llm = LLM(str(tmp_path), device=device, cuda_graphs=False, **SMALL)
    weights = sum(p.numel() * p.element_size() for p in llm.engine.model.parameters())
    assert weights > 0.9 * size > 150 * 2**20
    message = f"anonymous RSS grew by up to {rss.growth / 2**20:.0f} MiB loading {size / 2**20:.0f} MiB"
    assert rss.growth > 0.8 * size if device == "cpu" else rss.growth < 0.25 * size, message


# -------------------------------------------------------------------------------------------- CUDA only


@pytest.mark.gpu
def test_greedy_fp32_matches_transformers_on_cuda(family):
    name, path, model = family
    prompts = parity_prompts()
    expected = hf_greedy(copy.deepcopy(model).cuda(), prompts, PARITY_TOKENS)
    got = [o.token_ids for o in LLM(path, device="cuda", **SMALL).generate(prompts, GREEDY)]
    assert got == expected, f"{name}: {identical(got, expected)}/{PARITY_TOKENS * len(prompts)} identical"


@pytest.mark.gpu
def test_greedy_bf16_on_cuda_is_as_faithful_to_fp32_as_transformers(family):
    """bf16 tokens cannot be compared one for one (a rounding flips a routing choice and all later tokens differ):
    both sides' tokens are scored by the fp32 model on their own context (see ``bf16_faithful``)."""
    name, path, model = family
    prompts = parity_prompts()
    model32 = copy.deepcopy(model).cuda()
    expected = hf_greedy(copy.deepcopy(model32).to(torch.bfloat16), prompts, PARITY_TOKENS)
    got = [o.token_ids for o in LLM(path, device="cuda", dtype="bfloat16", **SMALL).generate(prompts, GREEDY)]
    ours, theirs = fp32_argmax_rate(model32, prompts, got), fp32_argmax_rate(model32, prompts, expected)
    same = identical(got, expected)
    print(f"{name} bf16: {same}/{PARITY_TOKENS * len(prompts)} identical to transformers; fp32-argmax rate ours "
          f"{ours:.3f}, transformers {theirs:.3f}")
    assert bf16_faithful(ours, theirs), (name, ours, theirs, same)


@pytest.fixture(scope="module")
def eager_and_graphs(mixtral):
    options = dict(device="cuda", max_num_seqs=128, max_num_batched_tokens=512, num_kv_blocks=1024,
                   max_model_len=256)
    yield LLM(mixtral[0], cuda_graphs=False, **options), LLM(mixtral[0], cuda_graphs=True, **options)
    _free_cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [3, 5, 70])
def test_cuda_graphs_decode_the_same_tokens_as_eager(eager_and_graphs, batch, monkeypatch):
    """Mixed prompt lengths and output lengths: the decode batch starts at ``batch`` (not a captured size: padded
    to 4, 8, 128) and shrinks through other sizes as sequences finish."""
    eager, graphs = eager_and_graphs
    g = torch.Generator().manual_seed(batch)
    lengths = torch.randint(1, 90, (batch,), generator=g).tolist()
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in lengths]
    params = [SamplingParams(max_tokens=8 + i % 17, temperature=0.0, ignore_eos=True) for i in range(batch)]
    runner, replays = graphs.engine.runner, []
    forward = runner.graphs.forward
    monkeypatch.setattr(runner.graphs, "forward", lambda inputs, size: replays.append(size) or forward(inputs, size))
    got = [o.token_ids for o in graphs.generate(prompts, params)]
    assert got == [o.token_ids for o in eager.generate(prompts, params)]
    bucket = min(s for s in runner.graphs.sizes if s >= batch)
    assert bucket in replays and len(set(replays)) > 1, replays  # replayed at the start size and smaller ones


@pytest.mark.gpu
def test_triton_attention_matches_torch_on_cuda(family):
    """Chunked prefill next to decodes, the prefix cache and preemption (12 blocks for six sequences)."""
    name, path, _ = family
    prompts = [[(5 * i + 3 * j) % 128 for j in range(n)] for i, n in enumerate([1, 23, 40, 16, 7, 33])]
    prompts[5] = prompts[2][:32] + [9]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    options = dict(device="cuda", max_num_seqs=6, max_num_batched_tokens=24, num_kv_blocks=12, block_size=16,
                   max_model_len=64)
    llm = LLM(path, attention_backend="triton", **options)
    assert type(llm.engine.runner.attention).__name__ == "TritonAttention"
    expected = LLM(path, attention_backend="torch", **options).generate(prompts, params)
    assert [o.token_ids for o in llm.generate(prompts, params)] == [o.token_ids for o in expected], name


@pytest.mark.gpu
def test_kv_pool_is_sized_from_free_gpu_memory(mixtral):
    """Blocks of 256 tokens: of 16, the tiny model's cache would be ~15M blocks on an H200, each a Python object."""
    blocks = {}
    for utilization in (0.5, 0.9):
        llm = LLM(mixtral[0], device="cuda", cuda_graphs=False, max_model_len=256, block_size=256,
                  gpu_memory_utilization=utilization)
        blocks[utilization] = llm.engine.blocks.num_blocks
        bytes_per_block = PagedKVCache.bytes_per_block(llm.engine.model.config, 256, torch.float32)
        del llm
        _free_cuda()
    total = torch.cuda.mem_get_info()[1]
    assert blocks[0.5] < blocks[0.9]
    # the same weights leave the same free memory: the difference is the 0.4 of the GPU between the two
    assert abs((blocks[0.9] - blocks[0.5]) * bytes_per_block - 0.4 * total) < 0.01 * total, blocks


@pytest.mark.gpu
def test_a_cuda_device_this_machine_lacks_is_a_one_line_value_error(mixtral):
    with pytest.raises(ValueError, match=r"^engine.device \('cuda:99'\)") as err:
        LLM(mixtral[0], device="cuda:99", **SMALL)
    assert "\n" not in str(err.value)


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_a_decode_forward_never_waits_for_the_host(mixtral, cuda_graphs):
    """``runner.forward`` of a 5-sequence decode step (padded to the graph of 8) under sync-debug "error": any
    device-to-host copy, ``.item()`` or synchronize in the model forward raises."""
    llm = LLM(mixtral[0], device="cuda", cuda_graphs=cuda_graphs, **SMALL)
    engine = llm.engine
    for i, n in enumerate([3, 17, 9, 30, 5]):
        engine.add_request(f"r{i}", [(3 * i + j) % 128 for j in range(n)],
                           SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    inputs, copies, _ = scheduled_decode(engine, 5)
    assert (engine.runner.graphs.size_for(inputs) == 8) if cuda_graphs else engine.runner.graphs is None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        logits = engine.runner.forward(inputs, copies)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert logits.shape == (5, engine.model.config.vocab_size) and bool(torch.isfinite(logits).all())


def test_the_prepared_device_check_runs_end_to_end_on_the_cpu():
    """``benchmarks/gpu_serve.py`` runs once on a lent GPU, with no second chance: its CPU smoke mode runs the same
    sections at tiny shapes, so it cannot rot between GPU sessions."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_serve", "--cpu-smoke"], capture_output=True,
                          text=True, timeout=600, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for section in ("parity", "offline", "decode", "pytest", "kernels"):
        assert re.search(rf"^  {section} +ok$", proc.stdout, re.MULTILINE), proc.stdout[-2000:]
