"""DeepSeek Sparse Attention (:mod:`serve.models.sparse_attention`): the indexer's choice equal to ``transformers``'
top-k for a prefill and a decode, the choice mattering (a dense run of the same weights generates otherwise), the
latent cache counting and moving the indexer keys, and the Triton backend refused for DSA models in one line.

Shape legend as :mod:`serve.models.sparse_attention`: S tokens, I indexer heads, J index_head_dim, K top-k.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from serve import LLM, SamplingParams
from serve.models import DecoderConfig
from serve.models.attention import TorchAttention, kv_cache_class
from serve.models.attention_backends import select_attention_backend
from serve.models.config import IndexerConfig, MLAConfig
from serve.models.latent_cache import LatentKVCache
from serve.models.loader import load_model
from serve.models.sparse_attention import decode_selection, prefill_selection, top_keys
from tests.serve.checkpoints import DSA_FAMILIES, hf_model, save
from tests.serve.test_cuda_graphs import ReplayedCall, _llm
from tests.serve.test_parity import GREEDY, _prompts, _reference


@pytest.fixture(scope="module", params=DSA_FAMILIES)
def dsa(request, tmp_path_factory):
    model = hf_model(request.param, seed=5)
    return request.param, model, save(model, tmp_path_factory.mktemp(request.param))


def test_top_keys_docstring_example():
    scores_XS = torch.tensor([[0.5, 2.0, -1.0, 1.0], [0.5, 2.0, -1.0, 1.0]])
    allowed_XS = torch.tensor([[True, True, True, True], [True, True, False, False]])
    keys_XK = top_keys(scores_XS, allowed_XS, 2)
    assert [sorted(k) for k in keys_XK.tolist()] == [[1, 3], [0, 1]]


@pytest.mark.parametrize("layer", [0, -1])
def test_selection_equals_transformers_topk(dsa, layer):
    """The same hidden states through ``transformers``' indexer and ours (loaded from the checkpoint): for every
    query of a 40-token prefill, and for the last one decoding over all 40 cached keys, the same set of keys."""
    _, hf, path = dsa
    ours = load_model(path)
    hf_indexer, indexer = hf.model.layers[layer].self_attn.indexer, ours.layers[layer].self_attn.indexer
    S, topk = 40, indexer.spec.topk
    assert S > 4 * topk
    torch.manual_seed(0)
    x_SD = torch.randn(S, hf.config.hidden_size)
    q_resid_SQ = torch.randn(S, hf.config.q_lora_rank)
    positions = torch.arange(S)
    cos, sin = hf.model.rotary_emb(x_SD[None], positions[None])
    causal_SS = positions[None, :] <= positions[:, None]
    with torch.no_grad():
        want_SK = hf_indexer(x_SD[None], q_resid_SQ[None], (cos, sin), causal_SS[None], positions[None])[0]
        index = indexer(x_SD, q_resid_SQ, ours.rope_cos[positions], ours.rope_sin[positions])
    want_SS = torch.zeros(S, S, dtype=torch.bool).scatter_(1, want_SK.long(), True) & causal_SS
    assert torch.equal(prefill_selection(index, index.k_TJ, causal_SS), want_SS)
    last = index.rows(slice(S - 1, S))
    got_1K = decode_selection(last, index.k_TJ[None], torch.ones(1, S, dtype=torch.bool))
    assert sorted(got_1K[0].tolist()) == sorted(want_SK[-1].tolist()) and got_1K.shape == (1, topk)


def test_selection_matters(dsa, tmp_path):
    """The same weights with ``index_topk`` past every sequence's length attend densely: they generate other
    tokens than the sparse model, which generates what ``transformers`` does."""
    family, hf, path = dsa
    prompts = _prompts(seed=6)[:3]
    expected = _reference(hf, prompts)
    llm = LLM(path, block_size=8, attention_backend="torch")
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == expected, family
    llm.engine.runner.attention.mla_absorb_decodes = False  # the naive decode over the selected latents agrees
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == expected, family
    dense = shutil.copytree(path, tmp_path / "dense")
    config = json.loads((dense / "config.json").read_text())
    (dense / "config.json").write_text(json.dumps({**config, "index_topk": 1024}))
    got = [o.token_ids for o in LLM(str(dense), block_size=8).generate(prompts, GREEDY)]
    assert got != expected, family


def test_graph_replays_select_as_eager_decoding(dsa):
    """Decode steps of 3 and 5 sequences replayed padded to 4 and 8 with ``max_model_len``-wide block tables (so
    every row selects among padding slots too) give the eager runner's tokens; the padding rows write the null
    block."""
    _, _, path = dsa
    prompts = [[(7 * i + j) % 128 for j in range(n)] for i, n in enumerate([3, 17, 40, 5, 16])]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    expected = [o.token_ids for o in _llm(path, False, "torch").generate(prompts, params)]
    llm = _llm(path, True, "torch")
    replays = ReplayedCall.replays
    for batch in (prompts[:3], prompts):
        got = [o.token_ids for o in llm.generate(batch, params)]
        assert got == [expected[prompts.index(p)] for p in batch]
    assert ReplayedCall.replays - replays >= 2 * 7
    cache = llm.engine.runner.cache
    assert cache.index_keys[:, cache.null_block].abs().sum() > 0  # the padding rows wrote their indexer keys there


def _config(indexer: IndexerConfig | None) -> DecoderConfig:
    return DecoderConfig(architecture="x", vocab_size=8, hidden_size=16, num_layers=3, num_heads=2, num_kv_heads=2,
                         head_dim=6, max_position_embeddings=64, num_experts=2, top_k=1, moe_ffn_size=4,
                         mla=MLAConfig(9, 5, 6, 7, softmax_scale=0.3, q_lora_rank=10, indexer=indexer))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bytes_per_block_counts_the_indexer_keys(dtype):
    """Each slot holds its latent (C = 9 + 6) and its indexer key (J = 11) in every layer; copy-on-write moves
    both."""
    BS, C, J = 4, 15, 11
    config = _config(IndexerConfig(topk=3, num_heads=2, head_dim=J))
    elem = torch.empty((), dtype=dtype).element_size()
    assert kv_cache_class(config) is LatentKVCache
    assert LatentKVCache.bytes_per_block(config, BS, dtype) == 3 * BS * (C + J) * elem
    assert LatentKVCache.bytes_per_block(_config(None), BS, dtype) == 3 * BS * C * elem
    cache = LatentKVCache(config, num_blocks=5, block_size=BS, dtype=dtype)
    assert cache.pool.shape == (3, 6, BS, C + J) and cache.pool.nbytes == 6 * cache.bytes_per_block(config, BS, dtype)
    assert cache.latent.shape == (3, 6, BS, C) and cache.index_keys.shape == (3, 6, BS, J)
    slots = torch.tensor([1, 6, 7])  # block 0 slot 1, block 1 slots 2 and 3
    latent, keys = torch.randn(3, C).to(dtype), torch.randn(3, J).to(dtype)
    cache.write(2, slots, latent, keys)
    assert torch.equal(cache.latent[2].reshape(-1, C)[slots], latent)
    assert torch.equal(cache.index_keys[2].reshape(-1, J)[slots], keys)
    cache.copy_blocks([(1, 4)])
    assert torch.equal(cache.pool[:, 4], cache.pool[:, 1]) and torch.equal(cache.index_keys[2, 4, 2], keys[1])


def test_triton_backend_refused_in_one_line(dsa):
    _, _, path = dsa
    with pytest.raises(ValueError, match=r"^engine\.attention_backend \('triton'\) cannot serve DeepSeek Sparse") as e:
        LLM(path, attention_backend="triton")
    assert "\n" not in str(e.value)
    assert select_attention_backend("auto", torch.device("cpu"), torch.bfloat16, sparse_mla=True).sparse_mla
    assert TorchAttention.sparse_mla
