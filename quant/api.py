"""``quantize_fp8``: put FP8 experts into a built layer or model (router and shared experts stay as they are)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from moe.config import Quant
from moe.experts import Experts
from moe.fields import enum_field
from quant.fp8 import Scheme, quantize_weight
from quant.fp8_experts import Fp8Experts


def quantize_fp8(module_or_weights: nn.Module | torch.Tensor, scheme: Scheme | Quant | str = Scheme.BLOCK):
    """Quantise routed-expert weights to e4m3fn; ``scheme``: ``"block"`` / ``"channel"``, or the project's
    ``"fp8-block"`` / ``"fp8-channel"`` (``moe.config.Quant``, ``quant.scheme=``).

    - a tensor ``[..., O, D]``: returns ``(q, scale)`` (see ``quant.fp8.quantize_weight``);
    - an ``moe.MoE`` or any module containing them: replaces each layer's ``experts`` with ``Fp8Experts``
      in place (and sets ``layer.config.quant``) and returns the module. Routers, shared experts and gates keep
      their precision. ``MoEConfig(quant="fp8-block")`` builds such a layer directly.
    """
    scheme = _scheme(scheme)
    if isinstance(module_or_weights, torch.Tensor):
        return quantize_weight(module_or_weights, scheme)
    # MoE layers are the modules holding routed experts (this package sits below moe.layer, which builds on it)
    layers: list[Any] = [m for m in module_or_weights.modules()
                         if isinstance(getattr(m, "experts", None), (Experts, Fp8Experts))]
    if not layers:
        raise ValueError(f"no moe.MoE layer in {type(module_or_weights).__name__}: patch it first (moe.patch_hf)")
    for layer in layers:
        ex = layer.experts
        if not isinstance(ex, Experts):
            raise ValueError(f"experts of type {type(ex).__name__} cannot be quantised again")
        config = dataclasses.replace(layer.config, quant=Quant(f"fp8-{scheme.value}"))
        with torch.no_grad():
            layer.experts = Fp8Experts(dataclasses.replace(ex.config, quant=config.quant), ex.num_experts, weights=ex)
        layer.config = config
    return module_or_weights


def _scheme(value: Scheme | Quant | str) -> Scheme:
    """``"block"``, ``"fp8-block"`` or ``Quant.FP8_BLOCK`` -> ``Scheme.BLOCK`` (``ValueError`` naming the value)."""
    if isinstance(value, str) and not isinstance(value, Scheme) and value.startswith("fp8-"):
        try:
            return Scheme(value.removeprefix("fp8-"))
        except ValueError:
            pass
    return enum_field(Scheme, "scheme", value)
