"""The two records that flow through the harness: a Case (what to check) and a Result (what was found).

cases/*.yaml --(harness.matrix)--> [Case] --(harness.runner)--> [Result] --(harness.reports)--> reports/
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

DEFAULT_KERNEL = "kernel:unified_attention"  # the kernel under test unless --kernel names another
DTYPES = ("fp8", "bf16", "fp16")
OUT_DTYPES = ("bf16", "fp16")
PATHS = ("2d", "3d")
LAYOUTS = ("contiguous", "strided", "shared_blocks", "exact_table")
SCALE_LAYOUTS = ("tensor", "per_seq_head")

# Axes a case is made of, in the order they appear in its id and in report columns.
AXES = (
    "q_dtype", "kv_dtype", "out_dtype", "scales", "scale_layout", "heads", "head_size",
    "block_size", "num_blocks", "seqs", "window", "softcap", "causal", "path", "layout", "seed",
)


@dataclass(frozen=True)
class Case:
    q_dtype: str                      # one of DTYPES
    kv_dtype: str                     # one of DTYPES
    out_dtype: str                    # one of OUT_DTYPES
    scales: tuple                     # (q_scale, k_scale, v_scale) floats, used when that tensor is fp8
    heads: tuple                      # (num_q_heads, num_kv_heads)
    head_size: int
    block_size: int                   # multiple of 8
    num_blocks: int                   # blocks in the paged cache (>= what the sequences need)
    seqs: str                         # name of the sequence mix
    seq_lens: tuple                   # ((query_len, kv_len), ...) of that mix
    window: int = -1                  # sliding window in tokens (-1: none) -> window_size=(window-1, 0)
    softcap: float = 0.0              # 0: none
    causal: bool = True
    path: str = "2d"                  # kernel launch path: "2d" whole-sequence, "3d" split-KV
    scale_layout: str = "tensor"      # "tensor": one scale; "per_seq_head": a scale per (seq, kv head)
    layout: str = "contiguous"        # "strided": q/out/block table are non-contiguous views;
                                      # "shared_blocks": sequences share their first block (prefix caching);
                                      # "exact_table": no spare block-table columns (see harness.inputs)
    seed: int = 0
    id: str = ""                      # stable readable id, filled by harness.matrix
    source: str = ""                  # "file.yaml" the case came from

    @property
    def queries_per_kv(self) -> int:
        """Query heads per kv head (GQA group size)."""
        return self.heads[0] // self.heads[1]

    @property
    def dtype_key(self) -> str:
        """Key of the tolerance table: q/kv/out."""
        return f"{self.q_dtype}/{self.kv_dtype}/{self.out_dtype}"

    def axis_values(self) -> dict:
        """Axis name -> printable value, for report columns and filters."""
        d = asdict(self)
        d["scales"] = "/".join(f"{s:g}" for s in self.scales)
        d["heads"] = f"{self.heads[0]}:{self.heads[1]}"
        return {a: d[a] for a in AXES}


@dataclass
class Result:
    id: str
    status: str                        # "PASS" | "FAIL" | "ERROR"
    axes: dict                         # Case.axis_values()
    metrics: dict = field(default_factory=dict)   # see harness.metrics.METRIC_NAMES
    rules: dict = field(default_factory=dict)     # rule name -> {"passed": bool, "ratio": float, ...}
    message: str = ""                  # why it failed or errored
    timings: dict = field(default_factory=dict)   # phase -> seconds

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "Result":
        return Result(**d)
