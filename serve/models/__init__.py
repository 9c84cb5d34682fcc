"""Decoder models and the registry of Hugging Face architectures they load from."""

from serve.models.config import ModelConfig, QKNorm
from serve.models.decoder import MoEDecoder
from serve.models.registry import ARCHITECTURES, Family, family_for

__all__ = ["ARCHITECTURES", "Family", "ModelConfig", "MoEDecoder", "QKNorm", "family_for"]
