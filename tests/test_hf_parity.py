"""After ``moe.patch_hf`` a transformers model's logits equal the original's (fp32, rel err <= 1e-4)."""

import pytest
import torch

import moe
from tests.hf_tiny import FAMILIES, tiny_model


def _output(out) -> torch.Tensor:
    """Logits, or the last hidden state of a text model without an LM head (Qwen3-VL-MoE's)."""
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_model_logits_match(family):
    model = tiny_model(family)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 33))
    with torch.no_grad():
        expected = _output(model(input_ids))
    n_moe = sum(1 for m in model.modules() if hasattr(m, "experts"))
    assert moe.patch_hf(model) == n_moe > 0
    assert not any(hasattr(m, "experts") and not isinstance(m, moe.MoE) for m in model.modules())
    with torch.no_grad():
        got = _output(model(input_ids))
    assert _rel_err(got, expected) <= 1e-4


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3"])
@pytest.mark.parametrize("tokens", [1, 33])
def test_block_parity_and_weight_sharing(family, tokens):
    model = tiny_model(family)
    block = next(m for m in model.modules() if hasattr(m, "experts"))
    ours = moe.MoE.from_hf(block)
    assert ours.experts.w13_E2FD is block.experts.gate_up_proj  # shared, not copied
    assert ours.experts.w2_EDF is block.experts.down_proj
    x = torch.randn(1, tokens, model.config.hidden_size)
    with torch.no_grad():
        assert _rel_err(ours(x), block(x)) <= 1e-5


def test_unsupported_block_raises_naming_class():
    model = tiny_model("mixtral")

    class StrangeMoeBlock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = torch.nn.Linear(2, 2)

    model.model.layers[0].mlp = StrangeMoeBlock()
    with pytest.raises(ValueError, match="StrangeMoeBlock"):
        moe.patch_hf(model)
    with pytest.raises(ValueError, match="StrangeMoeBlock"):
        moe.MoE.from_hf(StrangeMoeBlock())
