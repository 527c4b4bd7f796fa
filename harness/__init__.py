"""Numerical correctness harness for FP8 paged attention kernels.

cases/*.yaml -> harness.matrix -> harness.inputs -> kernel + reference -> harness.metrics -> harness.reports
"""
import os
import time

# When the process began its imports (torch's alone take seconds on a GPU host): verify reports
# this start-up as a phase of its own, so that its wall time is the command's.
STARTED = time.perf_counter()

import torch  # noqa: E402

# Without a GPU, any kernel under test runs in Triton's interpreter; Triton reads this variable
# when a kernel is decorated, i.e. before the kernel's module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
