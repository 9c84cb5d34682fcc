"""``shard_moe_token_split``: every rank holds the same batch, routes its share, all-gathers the outputs; the model
then equals the single-process model exactly (each expert sees the same rows in the same order)."""

from __future__ import annotations

import torch

from expert_parallel.token_split import TokenSplitDispatcher, shard_moe_token_split
from moe.layer import MoE
from quant import quantize_fp8
from serve.engine.config import DEFAULT_MODEL
from serve.models.layers import DenseCausalAttention
from serve.models.loader import load_model
from tests.dist_harness import run_ranks

TOKENS = (1, 3, 33)  # 1 and 3: some ranks' shares are empty or short


def _logits(model, ids_T: torch.Tensor) -> torch.Tensor:
    T = ids_T.shape[0]
    return model.logits(model(ids_T, torch.arange(T), DenseCausalAttention(1, T)))


def _compare(rank: int, world_size: int, fp8: str | None = None) -> dict:
    model = load_model(str(DEFAULT_MODEL), torch.float32, None)
    if fp8 is not None:  # FP8 experts (buffers, not parameters) shard the same way
        quantize_fp8(model, fp8)
    g = torch.Generator().manual_seed(7)
    batches = [torch.randint(0, model.config.vocab_size, (T,), generator=g) for T in TOKENS]
    with torch.no_grad():
        expected = [_logits(model, ids) for ids in batches]
        shard_moe_token_split(model, timeout_s=20)
        got = [_logits(model, ids) for ids in batches]
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    return {"exact": [torch.equal(a, b) for a, b in zip(got, expected, strict=True)],
            "max_err": [(a - b).abs().max().item() for a, b in zip(got, expected, strict=True)],
            "split": all(isinstance(m.dispatcher, TokenSplitDispatcher) for m in layers),
            "local_experts": len(layers[0].experts.w13_E2FD)}


def test_token_split_model_matches_single_process_exactly():
    for world_size in (2, 4):
        results = [r.unwrap() for r in run_ranks(_compare, world_size, timeout_s=180)]
        for rank, res in enumerate(results):
            assert res["split"] and res["local_experts"] == 8 // world_size, (world_size, rank, res)
            assert all(res["exact"]), (world_size, rank, res["max_err"])


def test_token_split_fp8_experts_match_single_process_exactly():
    for rank, res in enumerate(r.unwrap() for r in run_ranks(_compare, 2, "block", timeout_s=180)):
        assert res["split"] and res["local_experts"] == 4 and all(res["exact"]), (rank, res)
