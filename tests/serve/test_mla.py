"""Multi-head latent attention: the latent cache's size, absorbed decode equal to expanded attention, every
backend's MLA step (torch, the C decode kernel, Triton under its interpreter) against dense attention through
the one metadata / step API, RoPE and YaRN equal to ``transformers``', and decode CUDA-graph padding through the
latent cache's null block.

Shape legend as :mod:`serve.models.mla`: H heads, N nope dims, R rope dims, V value dims, L latent rank, C = L + R.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import transformers as tf
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_ds

from serve import LLM, SamplingParams
from serve.models import DecoderConfig
from serve.models.attention import DecodeGroup, PagedKVCache, PrefillChunk, TorchAttention, kv_cache_class
from serve.models.config import MLAConfig, YarnRope
from serve.models.cpu_attention import CpuAttention, paged_decode_available
from serve.models.latent_cache import LatentKVCache
from serve.models.mla import (
    DenseCausalMLA,
    MLAWeights,
    absorb_queries,
    deepseek_softmax_scale,
    expanded_attention,
    latent_attention,
    unabsorb_output,
)
from serve.models.rope import apply_rope_interleaved, rope_tables
from tests.serve.checkpoints import MLA, YARN, hf_model, save
from tests.serve.test_cuda_graphs import ReplayedCall, _llm

H, N, R, V, L, BS = 3, 5, 6, 7, 9, 4  # awkward, all different


def _config(num_layers: int = 2, **mla) -> DecoderConfig:
    return DecoderConfig(architecture="x", vocab_size=8, hidden_size=16, num_layers=num_layers, num_heads=H,
                         num_kv_heads=H, head_dim=R, max_position_embeddings=64, num_experts=2, top_k=1,
                         moe_ffn_size=4, mla=MLAConfig(L, N, R, V, softmax_scale=0.3, **mla))


def _weights() -> MLAWeights:
    return MLAWeights.of(torch.randn(H * (N + V), L) * 0.5, H, N, scale=(N + R) ** -0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_latent_cache_bytes_per_token_per_layer(dtype):
    config = _config(num_layers=3)
    elem = torch.empty((), dtype=dtype).element_size()
    assert kv_cache_class(config) is LatentKVCache
    per_token_layer = LatentKVCache.bytes_per_block(config, BS, dtype) / (config.num_layers * BS)
    assert per_token_layer == (L + R) * elem  # once for all heads
    cache = LatentKVCache(config, num_blocks=5, block_size=BS, dtype=dtype)
    assert cache.pool.shape == (3, 6, BS, L + R) and cache.null_block == 5 and cache.null_slot == 5 * BS
    assert cache.pool.nbytes == 6 * LatentKVCache.bytes_per_block(config, BS, dtype)
    gqa = DecoderConfig(**{**config.__dict__, "mla": None})
    assert kv_cache_class(gqa) is PagedKVCache


def test_engine_sizes_the_latent_pool(tmp_path):
    """The engine's pool: ``kv_cache_bytes`` over the latent cache's bytes per block (DeepSeek-shaped tiny model:
    L + R = 32 values per token per layer, where its 4 heads of K and V would take 4 x (20 + 20))."""
    path = save(hf_model("deepseek_v3"), tmp_path)
    per_block = 2 * 8 * (MLA["kv_lora_rank"] + MLA["qk_rope_head_dim"]) * 4  # layers x BS x C x fp32
    llm = LLM(path, block_size=8, kv_cache_bytes=per_block * 37)
    assert llm.engine.blocks.num_blocks == 37
    assert isinstance(llm.engine.runner.cache, LatentKVCache)
    assert llm.engine.runner.cache.pool.nbytes == per_block * 38  # + the null block


def test_absorbed_equals_expanded():
    """``q_nope W_UK . c + q_pe . k_pe`` over latents, projected by ``W_UV``, is attention over expanded K/V."""
    torch.manual_seed(0)
    w = _weights()
    S = 13
    q_nope, q_pe, latent = torch.randn(1, H, N), torch.randn(1, H, R), torch.randn(S, L + R)
    mask = torch.ones(1, S, dtype=torch.bool)  # the one query sees every key
    want = expanded_attention(q_nope, q_pe, latent, w, mask)
    got = unabsorb_output(latent_attention(absorb_queries(q_nope, q_pe, w), latent[None], L, w.scale, None), w)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the same by hand: per head, scores over expanded keys
    kv = (latent[:, :L] @ w.kv_b_weight.T).view(S, H, N + V)
    for h in range(H):
        k = torch.cat([kv[:, h, :N], latent[:, L:]], -1)
        p = torch.softmax((torch.cat([q_nope[0, h], q_pe[0, h]]) @ k.T) * w.scale, -1)
        torch.testing.assert_close(got[0, h], p @ kv[:, h, N:], rtol=1e-5, atol=1e-5)


def _backends():
    backends = [pytest.param(TorchAttention, id="torch"), pytest.param("torch-naive", id="torch-naive")]
    cpu_ok = paged_decode_available(torch.zeros(1))
    backends.append(pytest.param(CpuAttention, id="cpu", marks=pytest.mark.skipif(not cpu_ok, reason="no C kernel")))
    triton_ok = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
    backends.append(pytest.param("triton", id="triton", marks=pytest.mark.skipif(not triton_ok, reason="no triton")))
    return backends


@pytest.mark.parametrize("backend_cls", _backends())
def test_mla_step_decode_and_chunked_prefill_match_dense(backend_cls, poison_empty):
    """Every backend's ``mla_step``: prefill chunks (one over a cached prefix), then decodes of all sequences in
    two groups (one sequence with no history); scattered blocks; equal to dense causal MLA."""
    if backend_cls == "triton":
        from serve.models.triton_attention import TritonAttention as backend_cls  # noqa: N813
    naive = backend_cls == "torch-naive"  # decodes expanded (mla.expanded_decode), what the benchmark compares
    backend_cls = TorchAttention if naive else backend_cls
    torch.manual_seed(0)
    w = _weights()
    lens = [13, 1, 6, 22]
    inputs = [(torch.randn(n, H, N), torch.randn(n, H, R), torch.randn(n, L + R)) for n in lens]
    dense = [DenseCausalMLA(1, n).attend_latent(0, *x, w) for n, x in zip(lens, inputs, strict=True)]
    cache = LatentKVCache(_config(num_layers=1), num_blocks=32, block_size=BS, dtype=torch.float32)
    backend = backend_cls()
    backend.mla_absorb_decodes = not naive
    free = torch.randperm(32).tolist()
    tables = [[free.pop() for _ in range(-(-n // BS))] for n in lens]

    def slots(i, start, end):
        return [tables[i][p // BS] * BS + p % BS for p in range(start, end)]

    split = 9
    for seq, start, end in [(0, 0, lens[0] - 1), (2, 0, lens[2] - 1), (3, 0, split), (3, split, lens[3] - 1)]:
        x = [t[start:end] for t in inputs[seq]]
        chunk = PrefillChunk(0, end - start, start, torch.tensor(tables[seq]))
        meta = backend.metadata(torch.tensor(slots(seq, start, end)), [], [chunk])
        out = backend.mla_step(cache, meta).attend_latent(0, *x, w)
        torch.testing.assert_close(out, dense[seq][start:end], rtol=1e-5, atol=1e-5)
    last = [n - 1 for n in lens]
    x = [torch.stack([inputs[i][j][last[i]] for i in range(4)]) for j in range(3)]
    slot_mapping = torch.tensor([slots(i, last[i], lens[i])[0] for i in range(4)])
    groups = [DecodeGroup.build(0, tables[:1], lens[:1], BS), DecodeGroup.build(1, tables[1:], lens[1:], BS)]
    out = backend.mla_step(cache, backend.metadata(slot_mapping, groups, [])).attend_latent(0, *x, w)
    torch.testing.assert_close(out, torch.stack([dense[i][last[i]] for i in range(4)]), rtol=1e-5, atol=1e-5)


def test_rope_yarn_and_softmax_scale_equal_transformers():
    """YaRN tables (DeepSeek's mscale, ``mscale_all_dim`` 0.7: attention factor != 1), the interleaved rotation
    and the softmax scale, each against ``transformers``' DeepSeek-V3 code."""
    config = tf.DeepseekV3Config(**MLA, q_lora_rank=None, rope_parameters=dict(YARN), n_routed_experts=4,
                                 num_experts_per_tok=2, n_group=1, topk_group=1)
    rotary = hf_ds.DeepseekV3RotaryEmbedding(config)
    positions = torch.arange(256)[None]
    cos_hf, sin_hf = rotary(torch.zeros(1, dtype=torch.float32), positions)
    yarn = YarnRope(YARN["factor"], YARN["original_max_position_embeddings"], mscale=1.0, mscale_all_dim=0.7)
    cos, sin = rope_tables(MLA["qk_rope_head_dim"], 10000.0, 256, yarn)
    assert rotary.attention_scaling != 1.0
    assert torch.equal(cos, cos_hf[0]) and torch.equal(sin, sin_hf[0])
    x = torch.randn(256, 3, MLA["qk_rope_head_dim"])
    want, _ = hf_ds.apply_rotary_pos_emb_interleave(x.transpose(0, 1)[None], x.transpose(0, 1)[None], cos_hf, sin_hf)
    assert torch.equal(apply_rope_interleaved(x, cos, sin), want[0].transpose(0, 1))
    attention = hf_ds.DeepseekV3Attention(config, 0)
    qk = MLA["qk_nope_head_dim"] + MLA["qk_rope_head_dim"]
    assert math.isclose(deepseek_softmax_scale(qk, YARN["factor"], 0.7), attention.scaling, rel_tol=1e-15)
    assert attention.scaling != qk**-0.5


@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory):
    return save(hf_model("deepseek_v3", seed=2), tmp_path_factory.mktemp("deepseek_v3"))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_graph_replays_match_eager_and_pad_only_into_the_null_block(deepseek_dir, backend):
    """Batches of 3 and 5 decoding sequences padded to 4 and 8: the replayed steps give the eager runner's tokens,
    and besides the batch's own blocks only the latent cache's null block changes (the padding rows)."""
    if backend == "cpu" and not paged_decode_available(torch.zeros(1)):
        pytest.skip("no C compiler / AVX2 for the paged decode kernel")
    prompts = [[(7 * i + j) % 128 for j in range(n)] for i, n in enumerate([3, 17, 40, 5, 16])]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    expected = [o.token_ids for o in _llm(deepseek_dir, False, backend).generate(prompts, params)]
    llm = _llm(deepseek_dir, True, backend)
    runner, engine = llm.engine.runner, llm.engine
    replays = ReplayedCall.replays
    for b, batch in enumerate((prompts[:3], prompts)):
        before, used = runner.cache.pool.clone(), set()
        for i, prompt in enumerate(batch):
            engine.add_request(f"{b}-{i}", prompt, params)
        tokens = {}
        while engine.has_unfinished_requests():
            used |= {blk for seq in engine.requests.values() for blk in seq.block_table}
            for out in engine.step():
                tokens[out.request_id] = out.token_ids
        assert [tokens[f"{b}-{i}"] for i in range(len(batch))] == [expected[prompts.index(p)] for p in batch]
        changed = {int(blk) for blk in (runner.cache.pool != before).any(-1).any(-1).any(0).nonzero()}
        assert used and changed - used <= {runner.cache.null_block}
    assert ReplayedCall.replays - replays >= 2 * 7
    assert runner.cache.pool[:, runner.cache.null_block].abs().sum() > 0  # the padding did write there


def test_triton_backend_serves_the_same_tokens_as_torch(deepseek_dir):
    """The Triton MLA step in the engine (its interpreter on the CPU): chunked prefill beside decodes, a prefix
    from the cache and preemption give the torch backend's tokens."""
    if not (os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()):
        pytest.skip("needs Triton on CUDA or its interpreter (TRITON_INTERPRET=1)")
    prompts = [[(5 * i + 3 * j) % 128 for j in range(n)] for i, n in enumerate([1, 23, 40, 7])]
    prompts[3] = prompts[2][:32] + [9]  # two full blocks from the prefix cache
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    options = dict(max_num_seqs=4, max_num_batched_tokens=24, num_kv_blocks=7, block_size=16, max_model_len=64)
    expected = LLM(deepseek_dir, attention_backend="torch", **options).generate(prompts, params)
    llm = LLM(deepseek_dir, attention_backend="triton", **options)
    got = llm.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    assert llm.engine.scheduler.num_preemptions > 0 and any(o.num_cached_tokens for o in got)
