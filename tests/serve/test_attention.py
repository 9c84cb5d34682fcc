"""Paged attention (decodes and chunked prefills through block tables) equals dense causal attention."""

from __future__ import annotations

import pytest
import torch

from serve.engine.model_runner import split_by_length
from serve.models import DecoderConfig
from serve.models.attention import DecodeGroup, PagedKVCache, PrefillChunk, TorchAttention
from serve.models.config import AttentionWindow
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


def _naive(q_HD, keys_SHkvD, values_SHkvD, pos, window, sinks_H):
    """One query at ``pos`` over keys ``0..pos`` of its sequence, by the definitions: the window's keys only, the
    sink a logit with no value in the softmax."""
    seen = [j for j in range(pos + 1) if window.full or (window.sliding and j > pos - window.sliding)
            or (window.chunk and j // window.chunk == pos // window.chunk)]
    G = q_HD.shape[0] // keys_SHkvD.shape[1]
    out = []
    for h in range(q_HD.shape[0]):
        logits = torch.stack([q_HD[h] @ keys_SHkvD[j, h // G] / q_HD.shape[1] ** 0.5 for j in seen])
        if sinks_H is not None:
            logits = torch.cat([logits, sinks_H[h:h + 1]])
        p = torch.softmax(logits, 0)[:len(seen)]
        out.append(sum(p[i] * values_SHkvD[j, h // G] for i, j in enumerate(seen)))
    return torch.stack(out)


@pytest.mark.parametrize("window", [AttentionWindow(sliding=5), AttentionWindow(chunk=4), AttentionWindow()],
                         ids=["sliding5", "chunk4", "full"])
@pytest.mark.parametrize("sinks", [False, True], ids=["no-sinks", "sinks"])
@pytest.mark.parametrize("c_decode", [False, True], ids=["torch", "c-kernel"])
def test_windows_and_sinks_match_their_definition(c_decode, window, sinks):
    """Prefill chunks (with and without a cached prefix) and decodes of sequences shorter and longer than the
    window, through both CPU backends, against a per-query reference written from the definitions."""
    if c_decode and not paged_decode_available(torch.zeros(1)):
        pytest.skip("no C compiler / AVX2 for the paged decode kernel")
    torch.manual_seed(1)
    n = 17
    q, k, v = torch.randn(n, H, DH), torch.randn(n, HKV, DH), torch.randn(n, HKV, DH)
    sinks_H = torch.randn(H) * 2 if sinks else None
    ref = torch.stack([_naive(q[p], k, v, p, window, sinks_H) for p in range(n)])
    cache = PagedKVCache(_config(), num_blocks=16, block_size=BS, dtype=torch.float32)
    backend = CpuAttention() if c_decode else TorchAttention()
    table = torch.randperm(15)[: -(-n // BS)].tolist()  # block 15: the other sequence's

    def slots(start, end):
        return torch.tensor([table[p // BS] * BS + p % BS for p in range(start, end)])

    for start, end in ((0, 7), (7, 13)):  # a chunk with no prefix, then one over it
        meta = backend.metadata(slots(start, end), [], [PrefillChunk(0, end - start, start, torch.tensor(table))])
        out = backend.step(cache, meta).attend(0, q[start:end], k[start:end], v[start:end], window, sinks_H)
        torch.testing.assert_close(out, ref[start:end], rtol=1e-5, atol=1e-5)
    for p in range(13, n):  # decodes, the last ones past every window, beside a one-key sequence
        other = 15  # a block of its own, out of the table
        group = DecodeGroup.build(0, [table, [other]], [p + 1, 1], BS)
        q2, k2, v2 = (torch.stack([x[p], x[0] * 0.5]) for x in (q, k, v))
        meta = backend.metadata(torch.cat([slots(p, p + 1), torch.tensor([other * BS])]), [group], [])
        out = backend.step(cache, meta).attend(0, q2, k2, v2, window, sinks_H)
        torch.testing.assert_close(out[0], ref[p], rtol=1e-5, atol=1e-5)
        lone = _naive(q[0] * 0.5, k[:1] * 0.5, v[:1] * 0.5, 0, window, sinks_H)
        torch.testing.assert_close(out[1], lone, rtol=1e-5, atol=1e-5)


def test_dense_attention_applies_windows_and_sinks():
    torch.manual_seed(2)
    n, window, sinks_H = 9, AttentionWindow(sliding=3), torch.randn(H)
    q, k, v = torch.randn(n, H, DH), torch.randn(n, HKV, DH), torch.randn(n, HKV, DH)
    out = DenseCausalAttention(1, n).attend(0, q, k, v, window, sinks_H)
    ref = torch.stack([_naive(q[p], k, v, p, window, sinks_H) for p in range(n)])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
