"""Known-bad variants of kernel/unified_attention.py: the bugs the harness must catch.

Each variant is one named bug class. Most are source mutations: one exact snippet of the
kernel's source is replaced, the result is written to a temporary folder under a module name
of its own and imported, and its unified_attention is the variant. The snippet must occur
exactly once in the current source; when it does not, the variant is stale and reports so,
which keeps this catalogue in step with the kernel. The production kernel carries no fault
switches. A few variants are wrappers that call the real kernel with a wrong argument.

Adding a variant means adding one Mutation to CATALOGUE.
"""
from __future__ import annotations

import atexit
import functools
import inspect
import itertools
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from harness.kernels import import_file

if not torch.cuda.is_available():   # Triton reads this when the variant's kernels are decorated
    os.environ.setdefault("TRITON_INTERPRET", "1")

KERNEL_SOURCE = Path(__file__).resolve().parent.parent / "kernel" / "unified_attention.py"
SOURCE = "source"     # kind: one snippet of the kernel source replaced
WRAPPER = "wrapper"   # kind: the real kernel called with a wrong argument


@dataclass(frozen=True)
class Mutation:
    name: str
    description: str
    kind: str                       # SOURCE or WRAPPER
    old: str = ""                   # SOURCE: snippet that must occur exactly once
    new: str = ""                   # SOURCE: its replacement
    wrap_kwargs: tuple = ()         # WRAPPER: ((keyword, value), ...) forced on every call


CATALOGUE = (
    Mutation(
        "q_scale_ignored",
        "FP8 query descale never applied to the scores (the original FP8-query bug)",
        SOURCE,
        old="        qk_scale *= tl.load(q_scale_ptr + seq_idx * stride_qs_seq + kv_head * stride_qs_head)\n",
        new="        pass\n",
    ),
    Mutation(
        "k_scale_ignored",
        "FP8 key descale never applied to the scores",
        SOURCE,
        old="        qk_scale *= tl.load(k_scale_ptr + seq_idx * stride_ks_seq + kv_head * stride_ks_head)\n",
        new="        pass\n",
    ),
    Mutation(
        "v_scale_ignored",
        "FP8 value descale never applied to the accumulator",
        SOURCE,
        old="        acc *= tl.load(v_scale_ptr + seq_idx * stride_vs_seq + kv_head * stride_vs_head)\n",
        new="        pass\n",
    ),
    Mutation(
        "k_scale_applied_twice",
        "FP8 key descale multiplied into the score scale twice",
        SOURCE,
        old="        qk_scale *= tl.load(k_scale_ptr + seq_idx * stride_ks_seq + kv_head * stride_ks_head)\n",
        new="        qk_scale *= tl.load(k_scale_ptr + seq_idx * stride_ks_seq + kv_head * stride_ks_head)\n"
            "        qk_scale *= tl.load(k_scale_ptr + seq_idx * stride_ks_seq + kv_head * stride_ks_head)\n",
    ),
    Mutation(
        "split_kv_v_scale_dropped",
        "value descale applied on the 2D path only: split-KV segments store unscaled partials",
        SOURCE,
        old="    if KV_FP8:\n        acc *= tl.load(v_scale_ptr",
        new="    if KV_FP8 and not SPLIT_KV:\n        acc *= tl.load(v_scale_ptr",
    ),
    Mutation(
        "gqa_heads_interleaved",
        "query head h mapped to kv head h % num_kv_heads instead of h // queries_per_kv",
        SOURCE,
        old="    q_head = kv_head * queries_per_kv + offs_m % queries_per_kv\n",
        new="    q_head = (offs_m % queries_per_kv) * (num_q_heads // queries_per_kv) + kv_head\n",
    ),
    Mutation(
        "causal_mask_off_by_one",
        "causal mask hides each query's own key (< instead of <=)",
        SOURCE,
        old="        visible &= kv_pos[None, :] <= q_abs[:, None]\n",
        new="        visible &= kv_pos[None, :] < q_abs[:, None]\n",
    ),
    Mutation(
        "window_off_by_one",
        "sliding window one key short on the left edge (> instead of >=)",
        SOURCE,
        old="(kv_pos[None, :] >= q_abs[:, None] - window_left)",
        new="(kv_pos[None, :] > q_abs[:, None] - window_left)",
    ),
    Mutation(
        "block_table_first_row",
        "every sequence reads its pages through sequence 0's block-table row",
        SOURCE,
        old="kv_cache = (k_ptr, v_ptr, block_table_ptr, seq_idx,",
        new="kv_cache = (k_ptr, v_ptr, block_table_ptr, 0,",
    ),
    Mutation(
        "softcap_ignored",
        "logit softcap not passed to the kernel (softcap=0)",
        WRAPPER,
        wrap_kwargs=(("softcap", 0.0),),
    ),
    Mutation(
        "last_partial_tile_dropped",
        "tile loop rounds the kv length down to whole tiles, dropping the last partial tile",
        SOURCE,
        old="    tile_hi = tl.cdiv(kv_end, TILE)\n",
        new="    tile_hi = kv_end // TILE\n",
    ),
    Mutation(
        "split_kv_segment0_lost",
        "split-KV reduction gives segment 0 (which always holds keys) weight 0",
        SOURCE,
        old="    w = tl.math.exp2(m - m_all)",
        new="    w = tl.where(offs_s == 0, 0.0, tl.math.exp2(m - m_all))",
    ),
    Mutation(
        "p_rounded_to_fp8",
        "softmax probabilities rounded to FP8 before P.V (3 mantissa bits) instead of float16",
        SOURCE,
        old="PV_DTYPE=tl.float16 if kv_fp8 else",
        new="PV_DTYPE=tl.float8e4nv if kv_fp8 else",
    ),
    # The same bug classes in the one-warp TMA decode kernel (_fp8_decode_kernel), which decode
    # batches against an FP8 cache run; the scale folding above is shared by both kernels.
    Mutation(
        "tma_decode_v_scale_ignored",
        "TMA decode kernel: FP8 value descale never applied to the accumulator",
        SOURCE,
        old="    acc = tl.trans(accT) * tl.load(v_scale_ptr + seq_idx * stride_vs_seq + kv_head * stride_vs_head)\n",
        new="    acc = tl.trans(accT)\n",
    ),
    Mutation(
        "tma_decode_gqa_heads_interleaved",
        "TMA decode kernel: query head h mapped to kv head h % num_kv_heads",
        SOURCE,
        old="    q_head = kv_head * queries_per_kv + offs_m\n",
        new="    q_head = offs_m * (num_q_heads // queries_per_kv) + kv_head\n",
    ),
    Mutation(
        "tma_decode_window_off_by_one",
        "TMA decode kernel: sliding window one key short on the left edge",
        SOURCE,
        old="        visible = (kv_pos >= kv_start) & (kv_pos < seq_len)\n",
        new="        visible = (kv_pos > kv_start) & (kv_pos < seq_len)\n",
    ),
    Mutation(
        "tma_decode_block_table_first_row",
        "TMA decode kernel: every sequence reads its pages through sequence 0's block-table row",
        SOURCE,
        old="    row_start = block_table_ptr + seq_idx * stride_bt_seq\n",
        new="    row_start = block_table_ptr\n",
    ),
    Mutation(
        "tma_decode_last_partial_tile_dropped",
        "TMA decode kernel: the kv length rounded down to whole tiles",
        SOURCE,
        old="    tile_hi = tl.cdiv(seq_len, TILE)\n",
        new="    tile_hi = seq_len // TILE\n",
    ),
    Mutation(
        "tma_decode_p_rounded_to_fp8",
        "TMA decode kernel: probabilities rounded to FP8 before P.V",
        SOURCE,
        old="_cast(p, tl.float16, INTERPRET_SAFE)",
        new="_cast(p, tl.float8e4nv, INTERPRET_SAFE).to(tl.float16)",
    ),
)


class StaleMutation(Exception):
    """A source mutation whose snippet no longer occurs exactly once in the kernel source."""


def _check_catalogue(catalogue) -> None:
    names = [m.name for m in catalogue]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"mutation names used twice: {', '.join(dup)}")
    for m in catalogue:
        if m.kind not in (SOURCE, WRAPPER):
            raise ValueError(f"mutation {m.name}: kind {m.kind!r} is neither {SOURCE!r} nor {WRAPPER!r}")
        if m.kind == SOURCE and (not m.old or m.old == m.new):
            raise ValueError(f"mutation {m.name}: needs an old snippet and a different new one")
        if m.kind == WRAPPER and not m.wrap_kwargs:
            raise ValueError(f"mutation {m.name}: a wrapper needs wrap_kwargs")


_check_catalogue(CATALOGUE)


def kernel_source() -> str:
    return KERNEL_SOURCE.read_text(encoding="utf-8")


def mutated_source(mutation: Mutation, source: str) -> str:
    """The source with the mutation's snippet replaced; StaleMutation unless it occurs exactly once."""
    n = source.count(mutation.old)
    if n != 1:
        where = "does not occur" if n == 0 else f"occurs {n} times"
        raise StaleMutation(f"mutation {mutation.name} no longer applies to the current kernel source "
                            f"({KERNEL_SOURCE.name}): its snippet {where}, expected exactly once; "
                            f"update harness/mutants.py CATALOGUE to match the kernel")
    return source.replace(mutation.old, mutation.new)


def stale_mutations(catalogue=CATALOGUE, source: Optional[str] = None) -> dict:
    """{name: message} of the source mutations that no longer apply to `source` (default: the kernel's)."""
    source = kernel_source() if source is None else source
    stale = {}
    for m in catalogue:
        if m.kind == SOURCE:
            try:
                mutated_source(m, source)
            except StaleMutation as e:
                stale[m.name] = str(e)
    return stale


_module_counter = itertools.count()


@dataclass
class MutantBuilder:
    """Builds variants' kernels from one kernel source into one temporary folder; close() removes it.

    The folder must outlive every call of a variant: the Triton interpreter reads a kernel's source
    file when it first runs it.
    """
    source: Optional[str] = None
    folder: Optional[Path] = None
    _modules: list = field(default_factory=list)

    def __post_init__(self):
        if self.source is None:
            self.source = kernel_source()

    def build(self, mutation: Mutation) -> Callable:
        """The variant's unified_attention; raises StaleMutation, or whatever importing the mutant raises."""
        if mutation.kind == WRAPPER:
            return _wrapped_kernel(mutation)
        text = mutated_source(mutation, self.source)
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="kernel-mutants-"))
        safe = re.sub(r"\W", "_", mutation.name)
        module_name = f"_kernel_mutant_{safe}_{os.getpid()}_{next(_module_counter)}"
        path = self.folder / f"{module_name}.py"
        path.write_text(text, encoding="utf-8")
        module = import_file(path, module_name)
        self._modules.append(module_name)
        return module.unified_attention

    def close(self) -> None:
        for name in self._modules:
            sys.modules.pop(name, None)
        self._modules.clear()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _wrapped_kernel(mutation: Mutation) -> Callable:
    from kernel import unified_attention
    signature = inspect.signature(unified_attention)
    forced = dict(mutation.wrap_kwargs)

    @functools.wraps(unified_attention)   # keeps the signature, so the runner passes split_kv etc.
    def variant(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)   # the argument may come by position or keyword
        bound.arguments.update(forced)
        return unified_attention(*bound.args, **bound.kwargs)

    return variant


_BUILDER = None  # builds the variants asked for by name below; its folder lives as long as the process


def __getattr__(name: str) -> Callable:
    """A catalogue variant by name, as a kernel under test: `verify --kernel harness.mutants:q_scale_ignored`
    shows what the harness reports for that bug."""
    global _BUILDER
    mutation = next((m for m in CATALOGUE if m.name == name), None)
    if mutation is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _BUILDER is None:
        _BUILDER = MutantBuilder()
        atexit.register(_BUILDER.close)
    return _BUILDER.build(mutation)


def find(names, catalogue=CATALOGUE) -> list:
    """The catalogue entries with these names, in catalogue order; ValueError names unknown ones."""
    known = {m.name for m in catalogue}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)} (known: {', '.join(m.name for m in catalogue)})")
    return [m for m in catalogue if m.name in set(names)]
