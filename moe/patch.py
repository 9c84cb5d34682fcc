"""``patch_hf(model)``: every MoE block of a ``transformers`` model replaced in place by ``moe.MoE``.

The blocks are read by :mod:`moe.hf` (``MoE.from_hf``); this module, above ``moe.layer``, walks the model.
"""

from __future__ import annotations

import torch
from torch import nn

from moe.hf import is_supported, looks_like_moe, unsupported_reason
from moe.layer import MoE


class TupleOutputMoE(nn.Module):
    """Wraps ``MoE`` for HF blocks that return ``(hidden, router_tensor)`` (gpt-oss: weights; Llama 4: logits;
    OpenAI's privacy filter: weights / k, ``weight_scale``)."""

    def __init__(self, moe: MoE, second: str, weight_scale: float = 1.0) -> None:
        super().__init__()
        self.moe = moe
        self.second = second
        self.weight_scale = weight_scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, routing = self.moe.forward_with_routing(x)
        extra = routing.logits_TE if self.second == "logits" else routing.weights_TK * self.weight_scale
        return y, extra.to(x.dtype)


def patch_hf(model: nn.Module) -> int:
    """Replace every MoE block of ``model`` in place with ``moe.MoE``; returns how many were replaced.

    A module that looks like an MoE block (it has an ``experts`` child) but is not supported raises a
    ``ValueError`` naming its class, before anything is replaced. Blocks already replaced (a second call) are
    left alone: patching a patched model is a no-op returning 0.
    """
    targets: list[str] = []
    done: list[str] = []  # moe.MoE layers (and their wrappers) from an earlier call, with everything inside them
    for name, module in model.named_modules():
        if done and (done[0] == "" or _inside(name, done)):  # "": the model itself is an moe.MoE
            continue
        if isinstance(module, (MoE, TupleOutputMoE)):
            done.append(name)
        elif is_supported(module):
            targets.append(name)
        elif looks_like_moe(module) and not _inside(name, targets):
            raise ValueError(f"{unsupported_reason(module)} at {name!r}")
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        block = getattr(parent, child)
        layer = MoE.from_hf(block)
        scale = 1.0 / layer.config.top_k if type(block).__name__ == "OpenAIPrivacyFilterMLP" else 1.0
        replacement = TupleOutputMoE(layer, "logits" if _is_llama4(block) else "weights", scale) \
            if cls_returns_tuple(block) else layer
        setattr(parent, child, replacement)
    return len(targets)


def cls_returns_tuple(block: nn.Module) -> bool:
    return type(block).__name__ in ("GptOssMLP", "Llama4TextMoe", "OpenAIPrivacyFilterMLP")


def _is_llama4(block: nn.Module) -> bool:
    return type(block).__name__ == "Llama4TextMoe"


def _inside(name: str, parents: list[str]) -> bool:
    return any(name.startswith(p + ".") for p in parents)
