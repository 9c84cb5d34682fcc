"""Paged attention (decodes and chunked prefills through block tables) equals dense causal attention."""

from __future__ import annotations

import pytest
import torch

from serve.engine.model_runner import split_by_length
from serve.models import DecoderConfig
from serve.models.attention import DecodeGroup, PagedKVCache, PrefillChunk, TorchAttention
from serve.models.cpu_attention import CpuAttention, paged_decode_available
from serve.models.layers import DenseCausalAttention

H, HKV, DH, BS = 4, 2, 8, 4


def _config() -> DecoderConfig:
    return DecoderConfig(architecture="x", vocab_size=8, hidden_size=32, num_layers=1, num_heads=H,
                       num_kv_heads=HKV, head_dim=DH, max_position_embeddings=64, num_experts=2, top_k=1,
                       moe_ffn_size=4)


@pytest.mark.parametrize("c_decode", [False, True], ids=["torch", "c-kernel"])
def test_decode_and_chunked_prefill_match_dense(c_decode):
    """Both CPU backends through the one interface: ``metadata(...)`` then ``step(cache, metadata).attend``."""
    if c_decode and not paged_decode_available(torch.zeros(1)):
        pytest.skip("no C compiler / AVX2 for the paged decode kernel")
    torch.manual_seed(0)
    lens = [13, 1, 6, 22]  # sequence lengths; awkward sizes, one single-token sequence
    qkv = [(torch.randn(n, H, DH), torch.randn(n, HKV, DH), torch.randn(n, HKV, DH)) for n in lens]
    dense = []
    for q, k, v in qkv:
        dense.append(DenseCausalAttention(1, q.shape[0]).attend(0, q, k, v))
    cache = PagedKVCache(_config(), num_blocks=32, block_size=BS, dtype=torch.float32)
    backend = CpuAttention() if c_decode else TorchAttention()
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
        meta = backend.metadata(torch.tensor(slots(seq, start, end)), [], [chunk])
        out = backend.step(cache, meta).attend(0, q, k, v)
        torch.testing.assert_close(out, dense[seq][start:end], rtol=1e-5, atol=1e-5)
    # step 2: every sequence decodes its last token, in two padded groups (seq 1 has no history at all)
    last = [n - 1 for n in lens]
    q, k, v = (torch.stack([qkv[i][j][last[i]] for i in range(4)]) for j in range(3))
    slot_mapping = torch.tensor([slots(i, last[i], lens[i])[0] for i in range(4)])
    groups = [DecodeGroup.build(0, tables[:1], lens[:1], BS), DecodeGroup.build(1, tables[1:], lens[1:], BS)]
    out = backend.step(cache, backend.metadata(slot_mapping, groups, [])).attend(0, q, k, v)
    torch.testing.assert_close(out, torch.stack([dense[i][last[i]] for i in range(4)]), rtol=1e-5, atol=1e-5)


def test_split_by_length():
    assert split_by_length([900, 850, 400, 380, 120], min_saving=250) == [0, 2, 4]
    assert split_by_length([900, 850, 400, 380, 120], min_saving=1000) == [0, 2]  # 280 x 1 saves too little
    assert split_by_length([500] * 40) == [0] and split_by_length([]) == []


@pytest.mark.parametrize("dh", [16, 24, 128, 12], ids=["one-tile", "by-slice", "by-slice-128", "scalar-path"])
def test_c_decode_kernel_reads_only_each_sequences_keys(poison_empty, dh):
    """Long and short contexts, GQA groups of 3, blocks scattered; padding slots hold NaN and must not leak."""
    if not paged_decode_available(torch.zeros(1)):
        pytest.skip("no C compiler / AVX2 for the paged decode kernel")
    from serve.models.cpu_attention import paged_decode_attention

    Hkv, NB, bs, heads = 2, 60, 16, 6
    k, v = torch.randn(Hkv, NB, bs, dh), torch.randn(Hkv, NB, bs, dh)
    lens = [1, 16, 17, 222]
    tables = torch.randperm(NB)[:14 * len(lens)].view(len(lens), 14)  # disjoint, scattered
    for b, n in enumerate(lens):  # poison every slot past the sequence's end
        for j in range(n, 14 * bs):
            k[:, tables[b, j // bs], j % bs] = float("nan")
    q = torch.randn(len(lens), heads, dh)
    out = paged_decode_attention(q, k, v, tables, torch.tensor(lens))
    for b, n in enumerate(lens):
        keys = k[:, tables[b]].reshape(Hkv, -1, dh)[:, :n].repeat_interleave(heads // Hkv, 0)
        values = v[:, tables[b]].reshape(Hkv, -1, dh)[:, :n].repeat_interleave(heads // Hkv, 0)
        p = torch.softmax((q[b][:, None] * keys).sum(-1) / dh**0.5, dim=-1)
        torch.testing.assert_close(out[b], (p[..., None] * values).sum(1), rtol=1e-5, atol=1e-5)
