"""FP8 (e4m3fn) expert weights: ``quantize_fp8(module, scheme)`` with schemes ``channel`` and ``block``."""

from quant.api import quantize_fp8
from quant.fp8 import Scheme, dequantize_weight, quantize_weight
from quant.fp8_experts import Fp8Experts

__all__ = ["Fp8Experts", "Scheme", "dequantize_weight", "quantize_fp8", "quantize_weight"]
