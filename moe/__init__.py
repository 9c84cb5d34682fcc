"""The drop-in Mixture-of-Experts layer: ``MoE(MoEConfig(...))``, ``MoE.from_hf``, ``patch_hf``."""

from moe.config import Activation, Backend, MoEConfig, Quant
from moe.layer import MoE


def patch_hf(model) -> int:
    """Replace every MoE block of a ``transformers`` model in place; returns how many were replaced."""
    from moe.hf import patch_hf as _patch_hf

    return _patch_hf(model)


__all__ = ["Activation", "Backend", "MoE", "MoEConfig", "Quant", "patch_hf"]
