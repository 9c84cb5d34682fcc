"""Decoder models and the registry of Hugging Face architectures they load from."""

from serve.models.config import DecoderConfig, QKNorm
from serve.models.decoder import MoEDecoder
from serve.models.registry import ARCHITECTURES, Family, family_for

__all__ = ["ARCHITECTURES", "Family", "DecoderConfig", "MoEDecoder", "QKNorm", "family_for"]
