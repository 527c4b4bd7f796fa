"""Numerical correctness harness for FP8 paged attention kernels.

cases/*.yaml -> harness.matrix -> harness.inputs -> kernel + reference -> harness.metrics -> harness.reports
"""
import os

import torch

# Without a GPU, any kernel under test runs in Triton's interpreter; Triton reads this variable
# when a kernel is decorated, i.e. before the kernel's module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
