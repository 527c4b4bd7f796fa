"""Float32/float64 PyTorch reference for FP8 paged attention."""
from .attention import MAX_SCORE_ELEMENTS, LowPrecision, paged_attention_ref, paged_attention_refs
from .quant import (FP8_DTYPE, FP8_MAX, block_scale, count_saturated, dequantize, expand_scale,
                    is_fp8, quantize, token_scale)

__all__ = [
    "FP8_DTYPE", "FP8_MAX", "quantize", "dequantize", "count_saturated", "is_fp8",
    "expand_scale", "token_scale", "block_scale",
    "paged_attention_ref", "paged_attention_refs", "LowPrecision", "MAX_SCORE_ELEMENTS",
]
