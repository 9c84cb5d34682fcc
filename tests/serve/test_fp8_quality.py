"""FP8 experts keep the embedded default model's quality: over a fixed held-out English text, greedy next-token
agreement with the fp32 model >= 95% and perplexity within 2% of fp32, for both schemes (quantised while
loading); each MoE layer's error against its fp32 layer and the expert bytes against bf16 are measured too.
``python -m benchmarks.fp8_quality`` prints the same figures."""

from __future__ import annotations

import pytest
import torch

from benchmarks.fp8_quality import HELD_OUT_TEXT, agreement_and_perplexity, expert_bytes_ratio, layer_errors
from serve.engine.config import DEFAULT_MODEL
from serve.engine.tokenizer import Tokenizer
from serve.models.loader import load_model

SCHEMES = ("fp8-channel", "fp8-block")


@pytest.fixture(scope="module")
def ids_S():
    ids = Tokenizer(DEFAULT_MODEL).encode(HELD_OUT_TEXT)
    assert len(ids) > 500
    return torch.tensor(ids)


@pytest.fixture(scope="module")
def fp32_model():
    return load_model(DEFAULT_MODEL)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_greedy_agreement_and_perplexity(fp32_model, ids_S, scheme):
    model = load_model(DEFAULT_MODEL, quantization=scheme)
    agreement, ppl32, ppl8 = agreement_and_perplexity(fp32_model, model, ids_S)
    print(f"\n{scheme}: agreement {agreement:.2%}, perplexity fp32 {ppl32:.3f} fp8 {ppl8:.3f} ({ppl8 / ppl32:.4f}x)")
    assert agreement >= 0.95
    assert abs(ppl8 / ppl32 - 1) <= 0.02


@pytest.mark.parametrize("scheme", SCHEMES)
def test_layer_error_and_expert_bytes(fp32_model, ids_S, scheme):
    model = load_model(DEFAULT_MODEL, quantization=scheme)
    errors = layer_errors(fp32_model, model, ids_S)
    ratio = expert_bytes_ratio(fp32_model, model)
    print(f"\n{scheme}: layer errors vs fp32 {', '.join(f'{e:.2e}' for e in errors)}; expert bytes {ratio:.4f}x bf16")
    assert len(errors) == fp32_model.config.num_layers and all(0 < e < 0.05 for e in errors)
    assert ratio <= 0.52
