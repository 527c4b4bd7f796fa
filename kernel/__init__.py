"""Our Triton unified paged attention kernel.

On a machine without a CUDA GPU, Triton's interpreter runs the same kernel on CPU tensors.
Triton reads TRITON_INTERPRET when a kernel is decorated, so it is set here, before the kernel
module is imported; the interpreter-only workarounds live in one constexpr, INTERPRET_SAFE.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .unified_attention import SUPPORTED_DTYPES, LaunchConfig, launch_config, unified_attention  # noqa: E402

__all__ = ["unified_attention", "launch_config", "LaunchConfig", "SUPPORTED_DTYPES"]
