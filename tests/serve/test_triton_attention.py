"""``TritonAttention`` against ``TorchAttention`` (the reference) through the same metadata / step API.

On CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set in conftest before any kernel
module is imported): fp32 and fp16 only (the interpreter's bf16 ``tl.dot`` is wrong). The reference runs in fp32
on the same (rounded) values; its cache holds finite garbage where the Triton cache holds NaN (every slot no
key of the step's sequences was written to), so a kernel reading one slot too many shows up as NaN.
"""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
triton = pytest.importorskip("triton")

from serve.models import DecoderConfig  # noqa: E402
from serve.models import triton_attention as module  # noqa: E402
from serve.models.attention import (  # noqa: E402
    AttentionMetadata,
    DecodeGroup,
    PagedKVCache,
    PrefillChunk,
    TorchAttention,
)
from serve.models.config import FULL_ATTENTION, AttentionWindow  # noqa: E402
from serve.models.triton_attention import TritonAttention, store_kv, triton_attention_available  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and isinstance(module._attention_kernel, triton.runtime.JITFunction):
    raise RuntimeError("triton_attention was imported before TRITON_INTERPRET=1 was set: kernels cannot run on CPU")

pytestmark = pytest.mark.usefixtures("poison_empty")  # output rows no tile writes show up as NaN
LAYER = 1  # of 2: layer 0 of the Triton cache stays all-NaN
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}


class _Caches:
    """The same sequences (scattered, out-of-order blocks) in a reference cache and a Triton cache."""

    def __init__(self, H, Hkv, Dh, BS, dtype, totals, spare=3):
        self.H, self.Hkv, self.Dh, self.BS, self.dtype = H, Hkv, Dh, BS, dtype
        config = DecoderConfig(architecture="x", vocab_size=8, hidden_size=32, num_layers=2, num_heads=H,
                               num_kv_heads=Hkv, head_dim=Dh, max_position_embeddings=2048, num_experts=2, top_k=1,
                               moe_ffn_size=4)
        need = [-(-t // BS) for t in totals]
        free = torch.randperm(sum(need) + spare).tolist()
        self.tables = [[free.pop() for _ in range(n)] for n in need]
        self.ref = PagedKVCache(config, sum(need) + spare, BS, torch.float32, DEVICE)
        self.ref.pool.copy_(torch.randn(self.ref.pool.shape).to(dtype))
        self.tri = PagedKVCache(config, sum(need) + spare, BS, dtype, DEVICE)
        self.tri.pool.fill_(float("nan"))

    def slots(self, seq, start, end):
        return [self.tables[seq][p // self.BS] * self.BS + p % self.BS for p in range(start, end)]

    def views(self):  # [2, Hkv, slots, Dh] of LAYER, both caches
        return [c.pool[:, LAYER].view(2, self.Hkv, -1, self.Dh) for c in (self.ref, self.tri)]

    def cache(self, seq, n):
        """Keys 0 .. n-1 of ``seq`` are already in both caches (the same values)."""
        ref, tri = self.views()
        slots = torch.tensor(self.slots(seq, 0, n), dtype=torch.long, device=DEVICE)
        tri[:, :, slots] = ref[:, :, slots].to(self.dtype)

    def step(self, decodes, chunks, backend, pad=0, width=None, run=None, window=FULL_ATTENTION, sinks=None):
        """``decodes``: ``(seq, keys incl. the new one)``; ``chunks``: ``(seq, num_cached, num_tokens)``; ``pad``
        rows decode into the null slot reading only the null block; ``window`` / ``sinks``: every query's.
        Returns (triton out, reference out)."""
        tables = [self.tables[s] for s, _ in decodes] + [[self.ref.null_block]] * pad
        lens = [n for _, n in decodes] + [1] * pad
        groups = [DecodeGroup.build(0, tables, lens, self.BS, width=width)] if lens else []
        slots = sum((self.slots(s, n - 1, n) for s, n in decodes), []) + [self.ref.null_slot] * pad
        prefills = []
        for seq, cached, n in chunks:
            table = torch.tensor(self.tables[seq][: -(-(cached + n) // self.BS)])
            prefills.append(PrefillChunk(len(slots), n, cached, table))
            slots += self.slots(seq, cached, cached + n)
        T = len(slots)
        q = torch.randn(T, self.H, self.Dh).to(self.dtype).to(DEVICE)
        k, v = (torch.randn(T, self.Hkv, self.Dh).to(self.dtype).to(DEVICE) for _ in range(2))
        if pad:  # the engine's padding rows are the same token at position 0: the same K/V into the one slot
            k[len(decodes):len(lens)], v[len(decodes):len(lens)] = k[len(decodes)], v[len(decodes)]
        slot_mapping_T = torch.tensor(slots)
        meta = backend.metadata(slot_mapping_T, groups, prefills).to(DEVICE)
        ref_meta = AttentionMetadata(slot_mapping_T, groups, prefills).to(DEVICE)
        ref = TorchAttention().step(self.ref, ref_meta).attend(LAYER, q.float(), k.float(), v.float(), window, sinks)
        out = (run or (lambda m: backend.step(self.tri, m)))(meta).attend(LAYER, q, k, v, window, sinks)
        ref_view, tri_view = self.views()
        written = torch.tensor([s for s in slots if s != self.ref.null_slot], dtype=torch.long, device=DEVICE)
        assert torch.equal(tri_view[:, :, written], ref_view[:, :, written].to(self.dtype))  # the store kernel
        assert self.tri.pool[:, 1 - LAYER].isnan().all()
        return out, ref, meta


def _check(out, ref, dtype, case):
    assert out.dtype == dtype and out.shape == ref.shape and out.isfinite().all(), case
    err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
    print(f"{case}: max relative error {err:.2e}")
    assert err <= TOL[dtype], case


def test_available():
    assert triton_attention_available(torch.empty(0, device=DEVICE))
    assert triton_attention_available(torch.empty(0, dtype=torch.bfloat16, device=DEVICE))
    assert not triton_attention_available(torch.empty(0, dtype=torch.float64, device=DEVICE))


def test_docstring_example():
    groups = [DecodeGroup.build(0, [[3, 1], [2]], [5, 1], 4)]
    meta = TritonAttention(block_q=4).metadata(torch.arange(8), groups, [PrefillChunk(2, 6, 3, torch.tensor([5, 6]))])
    assert meta.tiles_N4.tolist() == [[0, 1, 4, 0], [1, 1, 0, 1], [2, 4, 3, 2], [6, 2, 7, 2]]
    assert meta.tiles_N4.dtype == meta.tables_RM.dtype == torch.int32
    assert meta.tables_RM.tolist() == [[3, 1], [2, 0], [5, 6]] and meta.block_q == 4
    assert TritonAttention(block_q=4).metadata(torch.arange(2), groups, []).block_q == 1  # decode-only steps


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_store_kv_matches_cache_write_and_skips_negative_slots(dtype):
    config = DecoderConfig(architecture="x", vocab_size=8, hidden_size=32, num_layers=2, num_heads=6,
                           num_kv_heads=3, head_dim=24, max_position_embeddings=64, num_experts=2, top_k=1,
                           moe_ffn_size=4)
    caches = [PagedKVCache(config, 6, 5, dtype, DEVICE) for _ in range(2)]
    caches[1].pool.copy_(caches[0].pool.copy_(torch.randn(caches[0].pool.shape)))
    kv = torch.randn(7, 2, 3, 24, dtype=torch.float32).to(DEVICE)  # a strided view of k (as from a fused qkv)
    k, v = kv[:, 0], kv[:, 1].to(dtype)
    slots = torch.tensor([3, -1, 29, 0, -1, 34, 12], device=DEVICE)
    store_kv(k, v, caches[0].k[1], caches[0].v[1], slots)
    keep = slots >= 0
    caches[1].write(1, slots[keep], k[keep], v[keep])
    assert torch.equal(caches[0].pool, caches[1].pool)


# (H, Hkv, Dh, BS, dtype, block_q): GQA groups 1, 2, 3 and 4 in fp32 and fp16; head dims 16, 24, 80; block
# sizes 4, 5, 7 and 16; 4 or 16 query tokens per prefill tile. bf16 on CUDA only (the interpreter's is wrong).
CASES = [(2, 2, 16, 4, torch.float32, 4), (4, 2, 24, 5, torch.float32, 4), (6, 2, 80, 16, torch.float32, 4),
         (4, 1, 16, 7, torch.float32, 16), (2, 2, 24, 16, torch.float16, 16), (4, 2, 16, 4, torch.float16, 4),
         (3, 1, 16, 5, torch.float16, 4), (4, 1, 80, 4, torch.float16, 4),
         pytest.param(4, 1, 24, 16, torch.bfloat16, 16, marks=pytest.mark.gpu)]


def _case_id(H, Hkv, Dh, BS, dtype, block_q):
    return f"H{H}-Hkv{Hkv}-Dh{Dh}-BS{BS}-{str(dtype)[6:]}-q{block_q}"


@pytest.mark.parametrize("H, Hkv, Dh, BS, dtype, block_q", CASES,
                         ids=[_case_id(*getattr(c, "values", c)) for c in CASES])
def test_mixed_step_matches_torch(H, Hkv, Dh, BS, dtype, block_q):
    """One step: decodes with contexts of 1, BS-1, BS, BS+1, 3BS+2 and 70 keys (three key tiles), a padding row,
    then prefill chunks without a cached prefix, over one (short or of 40 keys), one ending exactly at a block
    boundary, and a one-token one."""
    decode_lens = [1, BS - 1, BS, BS + 1, 3 * BS + 2, 70]
    chunks = [(0, 7), (5, 9), (40, 6), (3, 2 * BS - 3), (BS, 1)]  # (num_cached, num_tokens)
    caches = _Caches(H, Hkv, Dh, BS, dtype, decode_lens + [c + n for c, n in chunks])
    for seq, n in enumerate(decode_lens):
        caches.cache(seq, n - 1)
    for i, (cached, _) in enumerate(chunks):
        caches.cache(len(decode_lens) + i, cached)
    decodes = list(enumerate(decode_lens))
    prefills = [(len(decode_lens) + i, c, n) for i, (c, n) in enumerate(chunks)]
    out, ref, _ = caches.step(decodes, prefills, TritonAttention(block_q=block_q), pad=1)
    _check(out, ref, dtype, f"mixed H={H} Hkv={Hkv} Dh={Dh} BS={BS} {dtype} block_q={block_q}")


@pytest.mark.parametrize("window", [AttentionWindow(sliding=6), AttentionWindow(chunk=8), FULL_ATTENTION],
                         ids=["sliding6", "chunk8", "full"])
@pytest.mark.parametrize("sinks", [False, True], ids=["no-sinks", "sinks"])
def test_windows_and_sinks_match_torch(window, sinks):
    """Sliding (transformers' ``p - W < key <= p``) and chunked windows, with and without gpt-oss's sinks:
    decodes shorter and longer than the window, chunks starting inside and past it, tiles of 4 queries whose rows
    start their windows at different keys (so a row can see no key of the first iterations)."""
    dtype, BS = torch.float32, 4
    decode_lens = [1, 5, 6, 7, 19, 40]
    chunks = [(0, 11), (3, 9), (13, 6), (30, 1)]
    caches = _Caches(4, 2, 16, BS, dtype, decode_lens + [c + n for c, n in chunks])
    for seq, n in enumerate(decode_lens):
        caches.cache(seq, n - 1)
    for i, (cached, _) in enumerate(chunks):
        caches.cache(len(decode_lens) + i, cached)
    sinks_H = torch.randn(4, device=DEVICE) * 2 if sinks else None
    prefills = [(len(decode_lens) + i, c, n) for i, (c, n) in enumerate(chunks)]
    out, ref, _ = caches.step(list(enumerate(decode_lens)), prefills, TritonAttention(block_q=4), pad=1,
                              window=window, sinks=sinks_H)
    _check(out, ref, dtype, f"window {window} sinks={sinks}")


def test_long_context_decode_and_prefill():
    """A 1000-key decode beside a one-key one and a chunk over a 37-token prefix (default block_q)."""
    caches = _Caches(4, 2, 16, 16, torch.float32, [1000, 1, 37 + 20])
    caches.cache(0, 999)
    caches.cache(2, 37)
    out, ref, _ = caches.step([(0, 1000), (1, 1)], [(2, 37, 20)], TritonAttention())
    _check(out, ref, torch.float32, "long context 1000")


def test_graph_replay_reads_new_step_from_same_tensors():
    """A decode step captured once (the step object and its tensors), replayed with the next step's contents
    copied into the same tensors (as ``DecodeGraphs`` does): the kernel must read lengths and tables from them."""
    lens = [9, 4, 1]
    caches = _Caches(4, 2, 16, 4, torch.float32, [n + 1 for n in lens])
    backend = TritonAttention()
    for seq, n in enumerate(lens):
        caches.cache(seq, n - 1)
    captured = {}

    def capture(meta):
        captured["meta"], captured["step"] = meta, backend.step(caches.tri, meta)
        return captured["step"]

    out, ref, _ = caches.step(list(enumerate(lens)), [], backend, pad=1, width=4, run=capture)
    _check(out, ref, torch.float32, "graph step 1")

    def replay(meta):  # 4 -> 5 keys crosses a block boundary: a new block id in the same table tensor
        for name in ("slot_mapping_T", "tiles_N4", "tables_RM"):
            getattr(captured["meta"], name).copy_(getattr(meta, name))
        return captured["step"]

    out, ref, _ = caches.step([(s, n + 1) for s, n in enumerate(lens)], [], backend, pad=1, width=4, run=replay)
    _check(out, ref, torch.float32, "graph step 2 (replayed)")
