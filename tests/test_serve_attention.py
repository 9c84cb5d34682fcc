"""Paged attention (decodes and chunked prefills through block tables) equals dense causal attention."""

from __future__ import annotations

import torch

from serve.attention import DecodeGroup, PagedAttention, PagedKVCache, PrefillChunk
from serve.model_runner import split_by_length
from serve.models import ModelConfig
from serve.models.layers import DenseCausalBackend
from serve_checkpoints import one_thread  # noqa: F401 (autouse fixture)

H, HKV, DH, BS = 4, 2, 8, 4


def _config() -> ModelConfig:
    return ModelConfig(architecture="x", vocab_size=8, hidden_size=32, num_layers=1, num_heads=H,
                       num_kv_heads=HKV, head_dim=DH, max_position_embeddings=64, num_experts=2, top_k=1,
                       moe_ffn_size=4)


def test_decode_and_chunked_prefill_match_dense():
    torch.manual_seed(0)
    lens = [13, 1, 6, 22]  # sequence lengths; awkward sizes, one single-token sequence
    qkv = [(torch.randn(n, H, DH), torch.randn(n, HKV, DH), torch.randn(n, HKV, DH)) for n in lens]
    dense = []
    for q, k, v in qkv:
        dense.append(DenseCausalBackend(1, q.shape[0]).attend(0, q, k, v))
    cache = PagedKVCache(_config(), num_blocks=32, block_size=BS, dtype=torch.float32)
    free = torch.randperm(32).tolist()  # scattered, out-of-order blocks
    tables = [[free.pop() for _ in range(-(-n // BS))] for n in lens]

    def slots(i, start, end):
        return [tables[i][p // BS] * BS + p % BS for p in range(start, end)]

    # step 1: prefill everything but the last token, seq 3 in two chunks (the second reads the first back)
    split = 9
    parts = [(0, 0, lens[0] - 1), (2, 0, lens[2] - 1), (3, 0, split), (3, split, lens[3] - 1)]
    for seq, start, end in parts:
        q, k, v = (x[start:end] for x in qkv[seq])
        chunk = PrefillChunk(0, end - start, start, torch.tensor(tables[seq]))
        backend = PagedAttention(cache, torch.tensor(slots(seq, start, end)), [], [chunk])
        out = backend.attend(0, q, k, v)
        torch.testing.assert_close(out, dense[seq][start:end], rtol=1e-5, atol=1e-5)
    # step 2: every sequence decodes its last token, in two padded groups (seq 1 has no history at all)
    last = [n - 1 for n in lens]
    q, k, v = (torch.stack([qkv[i][j][last[i]] for i in range(4)]) for j in range(3))
    slot_mapping = torch.tensor([slots(i, last[i], lens[i])[0] for i in range(4)])
    groups = [DecodeGroup.build(0, tables[:1], lens[:1], BS), DecodeGroup.build(1, tables[1:], lens[1:], BS)]
    out = PagedAttention(cache, slot_mapping, groups, []).attend(0, q, k, v)
    torch.testing.assert_close(out, torch.stack([dense[i][last[i]] for i in range(4)]), rtol=1e-5, atol=1e-5)


def test_split_by_length():
    assert split_by_length([900, 850, 400, 380, 120], min_saving=250) == [0, 2, 4]
    assert split_by_length([900, 850, 400, 380, 120], min_saving=1000) == [0, 2]  # 280 x 1 saves too little
    assert split_by_length([500] * 40) == [0] and split_by_length([]) == []
