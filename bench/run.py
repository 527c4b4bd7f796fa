"""Benchmark the unified attention kernel against ceilings measured in the same run.

    python -m bench.run [--quick] [--out results/bench.json] [--plot results/bench.png] [--filter SUBSTR]
                        [--kernel MODULE:FUNCTION | FILE.py:FUNCTION]

For every shape and dtype config: build random inputs on the device, check the kernel against
reference.paged_attention_ref (a failed check skips timing), time it with triton's do_bench
(median), and relate the time to the copy bandwidth and matmul rates measured at the start, to
the floor those imply, and to PyTorch SDPA on the same data laid out contiguously in bf16.
`--quick` runs tiny shapes of every kind; without a GPU it runs under Triton's interpreter
with a wall-clock timer, no ceilings and no SDPA, so only correctness and the output files
mean anything there. `--kernel` times another kernel of vLLM's `unified_attention` signature
(a copy of ours with a change, a self-check variant, vLLM's own) on the same shapes, checks and
ceilings, so two kernels can be compared from one machine's runs (bench.compare).
"""
from __future__ import annotations

import argparse
import functools
import gc
import hashlib
import inspect
import itertools
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import kernel  # noqa: F401  (selects Triton's interpreter when there is no GPU, before triton loads kernels)
from kernel import unified_attention
from bench import fmt
from harness.matrix import load_tolerances
from harness.metrics import error_metrics, tolerance_rule
from harness.kernels import load_kernel
from harness.schema import DEFAULT_KERNEL
from reference import paged_attention_ref, quantize

import triton  # noqa: E402  (after kernel: the interpreter choice must come first)
import triton.testing  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NUM_Q_HEADS, NUM_KV_HEADS, HEAD_SIZE = 32, 8, 128
Q_SCALE, K_SCALE, V_SCALE = 0.75, 0.5, 0.25
DTYPES = {"fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16}
DTYPE_CONFIGS = (("fp8", "fp8"), ("bf16", "fp8"), ("bf16", "bf16"))  # (q, kv cache); out is bf16
OUT_DTYPE, OUT_DTYPE_NAME = torch.bfloat16, "bf16"

# Decode reads each byte once, so a cache that fits in L2 (50 MB on the H100) would time L2,
# not HBM: enough copies rotate that the bytes cycled exceed this.
ROTATE_BYTES = 200e6
MAX_COPIES = 32
# The reference materializes float32 scores and gathered K/V; above this, a smaller batch of
# the same per-sequence shape is checked instead.
REF_CHECK_BYTES = 4e9
# A row is timed only if its output passes verify's tolerance rule for its dtypes: every element
# within atol + rtol * |ref| and the mean error within mean_atol. The benchmark's inputs are in the
# regime that file's error analysis assumes: q, k and v standard normal once descaled, scores of
# unit variance. (A bound of 0.05 on the max error, used before, let a kernel rounding P to FP8
# through on some H200 rows: its errors measured 0.050-0.060, results/h200/probe_fp8_p.json.)
TOLERANCES = ROOT / "cases" / "tolerances.yaml"
RANDOM_CHUNK_ELEMENTS = 1 << 26  # bounds the float32 temporaries while filling big caches

COPY_BYTES = 1 << 30
MATMUL_N = 8192
DO_BENCH = dict(warmup=25, rep=100, return_mode="median")
CPU_TIMING_REPS = 2


# ----------------------------------------------------------------------------- shapes and counts
@dataclass(frozen=True)
class Shape:
    kind: str                              # "decode", "prefill" or "mixed"
    seqs: Tuple[Tuple[int, int], ...]      # (query_len, kv_len) of each sequence
    block_size: int
    causal: bool = True

    @property
    def num_seqs(self) -> int:
        return len(self.seqs)

    @property
    def q_lens(self) -> List[int]:
        return [q for q, _ in self.seqs]

    @property
    def kv_lens(self) -> List[int]:
        return [kv for _, kv in self.seqs]

    def groups(self) -> List[Tuple[int, int, int]]:
        """(query_len, kv_len, count) of each run of equal sequences, in order."""
        return [(q, kv, len(list(run))) for (q, kv), run in itertools.groupby(self.seqs)]

    @property
    def label(self) -> str:
        """'64x4096' (decode: sequences x kv_len; prefill: sequences x length), '1x2048@2048'
        for a chunk of 2048 new tokens after 2048 of context; parts joined by '+'."""
        parts = []
        for q, kv, n in self.groups():
            parts.append(f"{n}x{kv}" if q in (1, kv) else f"{n}x{q}@{kv - q}")
        return "+".join(parts)

    def subset(self, num_seqs: int) -> "Shape":
        return Shape(self.kind, self.seqs[:num_seqs], self.block_size, self.causal)


def decode(num_seqs: int, kv_len: int, block_size: int) -> Shape:
    return Shape("decode", ((1, kv_len),) * num_seqs, block_size)


def prefill(num_seqs: int, length: int, block_size: int) -> Shape:
    return Shape("prefill", ((length, length),) * num_seqs, block_size)


def mixed(new_tokens: int, context: int, num_decodes: int, decode_len: int, block_size: int) -> Shape:
    # The prefill chunk comes first so that a checked subset of sequences keeps it.
    return Shape("mixed", ((new_tokens, new_tokens + context),) + ((1, decode_len),) * num_decodes, block_size)


def full_shapes() -> List[Shape]:
    shapes = [decode(n, kv, bs) for bs in (16, 64)
              for n, kv in ((1, 32768), (8, 4096), (64, 4096), (256, 1024), (64, 8192))]
    shapes += [prefill(1, 8192, 64), prefill(4, 4096, 64), prefill(4, 4096, 16), prefill(2, 1024, 64)]
    shapes += [mixed(2048, 2048, 64, 4096, 16)]
    return shapes


def quick_shapes() -> List[Shape]:
    return [decode(2, 64, 16), prefill(2, 64, 16), mixed(32, 32, 2, 64, 16)]


def attended_keys(q_len: int, kv_len: int, causal: bool = True) -> int:
    """Query-key pairs one sequence computes: every key for each query, or the causal part
    (query i of q_len after `context` keys sees context + i + 1 of them)."""
    if not causal:
        return q_len * kv_len
    context = kv_len - q_len
    return q_len * context + q_len * (q_len + 1) // 2


def attention_flops(seqs: Sequence[Tuple[int, int]], num_q_heads: int, head_size: int,
                    causal: bool = True) -> int:
    """2 FLOPs per multiply-add in Q.K^T and again in P.V: 4 * pairs * heads * head_size."""
    return 4 * num_q_heads * head_size * sum(attended_keys(q, kv, causal) for q, kv in seqs)


def kv_cache_bytes(seqs: Sequence[Tuple[int, int]], num_kv_heads: int, head_size: int, kv_elem_size: int) -> int:
    """K and V bytes a kernel must read: each sequence's kv_len tokens, both caches."""
    return sum(kv for _, kv in seqs) * num_kv_heads * head_size * kv_elem_size * 2


def attention_bytes(seqs: Sequence[Tuple[int, int]], num_q_heads: int, num_kv_heads: int, head_size: int,
                    q_elem_size: int, kv_elem_size: int, out_elem_size: int) -> int:
    """K and V read, plus q read and out written."""
    tokens = sum(q for q, _ in seqs)
    return (kv_cache_bytes(seqs, num_kv_heads, head_size, kv_elem_size)
            + tokens * num_q_heads * head_size * (q_elem_size + out_elem_size))


def reference_bytes(seqs: Sequence[Tuple[int, int]]) -> int:
    """Float32 scores plus gathered float32 K and V the reference holds for these sequences."""
    return 4 * sum(q * kv * NUM_Q_HEADS + 2 * kv * NUM_KV_HEADS * HEAD_SIZE for q, kv in seqs)


def sequences_to_check(shape: Shape, limit: float = REF_CHECK_BYTES) -> int:
    """The longest prefix of the batch the reference can take under `limit`, but at least two
    sequences (a kernel that mislocates later sequences must fail; the reference splits long
    sequences into query chunks itself, so its memory stays bounded)."""
    total = 0
    for n, seq in enumerate(shape.seqs):
        total += reference_bytes([seq])
        if total > limit:
            return min(shape.num_seqs, max(2, n))
    return shape.num_seqs


def row_id(shape: Shape, q_dtype: str, kv_dtype: str) -> str:
    return f"{shape.kind} {shape.label} bs{shape.block_size} q={q_dtype} kv={kv_dtype}"


# ----------------------------------------------------------------------------- inputs
def random_tensor(shape: Tuple[int, ...], dtype_name: str, scale: float, gen: torch.Generator,
                  device: torch.device) -> torch.Tensor:
    """randn values, FP8 through reference.quantize with `scale`, filled in chunks."""
    out = torch.empty(shape, dtype=DTYPES[dtype_name], device=device)
    flat = out.view(shape[0], -1)
    rows = max(1, RANDOM_CHUNK_ELEMENTS // flat.shape[1])
    for start in range(0, shape[0], rows):
        n = min(rows, shape[0] - start)
        x = torch.randn((n, flat.shape[1]), generator=gen, device=device)
        flat[start:start + n] = quantize(x, scale) if dtype_name == "fp8" else x.to(out.dtype)
    return out


def rotating_copies(shape: Shape, q_dtype: str, kv_dtype: str, quick: bool) -> int:
    per_copy = attention_bytes(shape.seqs, NUM_Q_HEADS, NUM_KV_HEADS, HEAD_SIZE,
                               DTYPES[q_dtype].itemsize, DTYPES[kv_dtype].itemsize, 0)
    copies = min(MAX_COPIES, max(1, math.ceil(ROTATE_BYTES / per_copy)))
    return min(copies, 2) if quick else copies


def build_calls(shape: Shape, q_dtype: str, kv_dtype: str, copies: int, device: torch.device,
                seed: int) -> List[dict]:
    """Keyword arguments of `unified_attention` for each copy: its own q, caches and block
    table (a random permutation of its blocks); lengths, scales and out are shared."""
    gen = torch.Generator(device=device).manual_seed(seed)
    table_gen = torch.Generator().manual_seed(seed)
    bs = shape.block_size
    q_lens, kv_lens = shape.q_lens, shape.kv_lens
    num_tokens = sum(q_lens)
    blocks = [math.ceil(kv / bs) for kv in kv_lens]
    num_blocks = sum(blocks)
    cu_seqlens_q = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
    seqused_k = torch.tensor(kv_lens, dtype=torch.int32, device=device)

    def descale(value: float, dtype_name: str) -> Optional[torch.Tensor]:
        if dtype_name != "fp8":
            return None
        return torch.full((shape.num_seqs, NUM_KV_HEADS), value, dtype=torch.float32, device=device)

    common = dict(
        out=torch.empty(num_tokens, NUM_Q_HEADS, HEAD_SIZE, dtype=OUT_DTYPE, device=device),
        cu_seqlens_q=cu_seqlens_q, seqused_k=seqused_k,
        max_seqlen_q=max(q_lens), max_seqlen_k=max(kv_lens),
        softmax_scale=HEAD_SIZE ** -0.5, causal=shape.causal, window_size=(-1, -1), softcap=0.0,
        q_descale=descale(Q_SCALE, q_dtype), k_descale=descale(K_SCALE, kv_dtype),
        v_descale=descale(V_SCALE, kv_dtype),
    )
    calls = []
    for _ in range(copies):
        perm = torch.randperm(num_blocks, generator=table_gen).to(torch.int32)
        table = torch.zeros(shape.num_seqs, max(blocks), dtype=torch.int32)
        first = 0
        for s, n in enumerate(blocks):
            table[s, :n] = perm[first:first + n]
            first += n
        cache_shape = (num_blocks, bs, NUM_KV_HEADS, HEAD_SIZE)
        calls.append(dict(
            common,
            q=random_tensor((num_tokens, NUM_Q_HEADS, HEAD_SIZE), q_dtype, Q_SCALE, gen, device),
            k=random_tensor(cache_shape, kv_dtype, K_SCALE, gen, device),
            v=random_tensor(cache_shape, kv_dtype, V_SCALE, gen, device),
            block_table=table.to(device),
        ))
    return calls


# ----------------------------------------------------------------------------- timing
def time_us(fn: Callable[[], object], on_gpu: bool) -> float:
    """Median microseconds: do_bench on a GPU; a few wall-clock runs under the interpreter
    (which compiles nothing, so needs no warm-up)."""
    if on_gpu:
        return float(triton.testing.do_bench(fn, **DO_BENCH)) * 1e3
    times = []
    for _ in range(CPU_TIMING_REPS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def graph_time_us(calls: Sequence[Callable[[], object]]) -> float:
    """Median GPU microseconds per call, host launch cost excluded: the calls (one per rotating
    copy) are captured in one CUDA graph, which do_bench replays (it flushes L2 between replays).
    Decode kernels of a few tens of microseconds would otherwise time Python's launch path."""
    for fn in calls:  # compile and allocate outside the capture
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    us = float(triton.testing.do_bench(graph.replay, **DO_BENCH)) * 1e3 / len(calls)
    del graph
    return us


def host_time_us(fn: Callable[[], object], reps: int = 200) -> float:
    """Mean host microseconds per call of fn (argument checks, launch), GPU work not awaited."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / reps * 1e6


def measure_ceilings(device: torch.device) -> dict:
    """Copy bandwidth and matmul rates of this device, each null with its error if it fails."""
    ceilings = {"copy_tbps": None, "bf16_matmul_tflops": None, "fp8_matmul_tflops": None,
                "copy_bytes": COPY_BYTES, "matmul_n": MATMUL_N, "errors": {}}
    try:
        src = torch.randn(COPY_BYTES // 4, device=device)
        dst = torch.empty_like(src)
        us = time_us(lambda: dst.copy_(src), True)
        ceilings["copy_tbps"] = 2 * COPY_BYTES / (us * 1e-6) / 1e12  # bytes read + written
        del src, dst
    except Exception as exc:  # noqa: BLE001  (a ceiling that fails is recorded, not fatal)
        ceilings["errors"]["copy"] = repr(exc)
    flops = 2 * MATMUL_N ** 3
    try:
        a = torch.randn(MATMUL_N, MATMUL_N, device=device, dtype=torch.bfloat16)
        b = torch.randn(MATMUL_N, MATMUL_N, device=device, dtype=torch.bfloat16)
        ceilings["bf16_matmul_tflops"] = flops / (time_us(lambda: torch.matmul(a, b), True) * 1e-6) / 1e12
        del a, b
    except Exception as exc:  # noqa: BLE001
        ceilings["errors"]["bf16_matmul"] = repr(exc)
    try:
        a = torch.randn(MATMUL_N, MATMUL_N, device=device).to(torch.float8_e4m3fn)
        b_row_major = torch.randn(MATMUL_N, MATMUL_N, device=device).to(torch.float8_e4m3fn)
        b = b_row_major.t().contiguous().t()  # _scaled_mm wants b column-major
        one = torch.tensor(1.0, device=device)
        fn = lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)  # noqa: E731
        ceilings["fp8_matmul_tflops"] = flops / (time_us(fn, True) * 1e-6) / 1e12
        del a, b, b_row_major
    except Exception as exc:  # noqa: BLE001
        ceilings["errors"]["fp8_matmul"] = repr(exc)
    torch.cuda.empty_cache()
    return ceilings


# ----------------------------------------------------------------------------- SDPA baseline
def _dense_kv(cache: torch.Tensor, table: torch.Tensor, seqs: List[int], kv_len: int,
              scale: float) -> torch.Tensor:
    """[len(seqs), kv_heads, kv_len, head] bf16, dequantized, contiguous."""
    bs = cache.shape[1]
    cols = math.ceil(kv_len / bs)
    idx = table[seqs, :cols].long()                                    # [G, cols]
    dense = cache[idx].reshape(len(seqs), cols * bs, NUM_KV_HEADS, HEAD_SIZE)[:, :kv_len]
    dense = dense.to(torch.bfloat16) * scale if cache.dtype == DTYPES["fp8"] else dense.to(torch.bfloat16)
    return dense.permute(0, 2, 1, 3).contiguous()


def build_sdpa(shape: Shape, call: dict) -> Tuple[Callable[[], object], str]:
    """One SDPA call per group of equal sequences, on bf16 copies of `call`'s data; returns the
    function to time and how GQA was expressed."""
    F = torch.nn.functional
    q_is_fp8 = call["q"].dtype == DTYPES["fp8"]
    k_scale = K_SCALE if call["k"].dtype == DTYPES["fp8"] else 1.0
    v_scale = V_SCALE if call["v"].dtype == DTYPES["fp8"] else 1.0
    starts = [0] + list(itertools.accumulate(shape.q_lens))
    work, first = [], 0
    for q_len, kv_len, n in shape.groups():
        seqs = list(range(first, first + n))
        first += n
        tokens = torch.cat([torch.arange(starts[s], starts[s] + q_len) for s in seqs]).to(call["q"].device)
        q = call["q"][tokens].to(torch.bfloat16)
        q = (q * Q_SCALE if q_is_fp8 else q).view(n, q_len, NUM_Q_HEADS, HEAD_SIZE).permute(0, 2, 1, 3).contiguous()
        k = _dense_kv(call["k"], call["block_table"], seqs, kv_len, k_scale)
        v = _dense_kv(call["v"], call["block_table"], seqs, kv_len, v_scale)
        mask, is_causal = None, False
        if shape.causal and q_len > 1:
            if q_len == kv_len:
                is_causal = True
            else:  # a chunk after context: causal aligned to the bottom right
                try:
                    from torch.nn.attention.bias import causal_lower_right
                    mask = causal_lower_right(q_len, kv_len)
                except ImportError:
                    mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril(kv_len - q_len)
        work.append([q, k, v, mask, is_causal])

    def run_all(gqa: bool):
        for q, k, v, mask, is_causal in work:
            extra = {"enable_gqa": True} if gqa else {}
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           scale=HEAD_SIZE ** -0.5, **extra)
    try:
        run_all(True)
        return (lambda: run_all(True)), "enable_gqa"
    except (TypeError, RuntimeError):
        rep = NUM_Q_HEADS // NUM_KV_HEADS
        for item in work:
            item[1] = item[1].repeat_interleave(rep, dim=1)
            item[2] = item[2].repeat_interleave(rep, dim=1)
        return (lambda: run_all(False)), "repeat_interleave"


# ----------------------------------------------------------------------------- compile facts
def compiled_kernel_facts(call: dict, attention: Callable = unified_attention) -> dict:
    """Registers, spills and shared memory of each Triton kernel of attention's module that one
    call launches, read off the compiled kernels the launches return (null where unavailable)."""
    try:
        module = sys.modules[attention.__module__]
        jit_functions = {name: obj for name, obj in vars(module).items()
                         if isinstance(obj, triton.runtime.jit.KernelInterface)}  # jit, autotune, heuristics
    except Exception as exc:  # noqa: BLE001
        return {"error": repr(exc)}
    launched: Dict[str, object] = {}

    def spy(name, fn):
        original = fn.run

        def run(*args, **kwargs):
            compiled = original(*args, **kwargs)
            launched[name] = compiled
            return compiled
        return run
    try:
        for name, fn in jit_functions.items():
            fn.run = spy(name, fn)  # an instance attribute: fn[grid](...) calls self.run
        attention(**call)
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001
        return {"error": repr(exc)}
    finally:
        for fn in jit_functions.values():
            fn.__dict__.pop("run", None)
    facts = {}
    for name, compiled in launched.items():
        entry = {"n_regs": None, "n_spills": None, "shared_bytes": None, "num_warps": None, "num_stages": None}
        try:
            if getattr(compiled, "n_regs", None) is None and hasattr(compiled, "_init_handles"):
                compiled._init_handles()
            meta = getattr(compiled, "metadata", None)
            entry.update(n_regs=getattr(compiled, "n_regs", None), n_spills=getattr(compiled, "n_spills", None),
                         shared_bytes=getattr(meta, "shared", None), num_warps=getattr(meta, "num_warps", None),
                         num_stages=getattr(meta, "num_stages", None))
        except Exception as exc:  # noqa: BLE001
            entry["error"] = repr(exc)
        facts[name] = entry
    return {"kernels": facts} if facts else {"error": "no compiled kernel returned by the launch"}


def compile_fact_targets(planned: List[Tuple[Shape, str, str]]) -> Dict[str, str]:
    """kind -> row id whose compile facts are recorded: the FP8 decode 64x4096 bs16 and prefill
    4x4096 bs64 rows if run, else the first FP8 row of that kind."""
    preferred = {"decode": "decode 64x4096 bs16 q=fp8 kv=fp8", "prefill": "prefill 4x4096 bs64 q=fp8 kv=fp8"}
    ids = [row_id(s, q, kv) for s, q, kv in planned]
    targets = {}
    for kind, want in preferred.items():
        if want in ids:
            targets[kind] = want
        else:
            fp8 = [i for (s, q, kv), i in zip(planned, ids) if s.kind == kind and q == kv == "fp8"]
            if fp8:
                targets[kind] = fp8[0]
    return targets


# ----------------------------------------------------------------------------- one row
def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@functools.lru_cache(maxsize=None)
def _tolerances():
    return load_tolerances(TOLERANCES)


def check_row(shape: Shape, q_dtype: str, kv_dtype: str, calls: List[dict], device: torch.device,
              seed: int, attention: Callable = unified_attention) -> dict:
    """The kernel's output against the reference, on the timed batch or a prefix of it, judged by
    cases/tolerances.yaml's tolerance rule for this row's dtypes."""
    n_check = sequences_to_check(shape)
    call = calls[0] if n_check == shape.num_seqs else \
        build_calls(shape.subset(n_check), q_dtype, kv_dtype, 1, device, seed + 1)[0]
    out = call["out"]
    out.fill_(float("nan"))  # unwritten outputs must show
    attention(**call)
    ref = paged_attention_ref(
        call["q"], call["k"], call["v"], cu_seqlens_q=call["cu_seqlens_q"], seqused_k=call["seqused_k"],
        block_table=call["block_table"], softmax_scale=call["softmax_scale"], causal=call["causal"],
        q_descale=call["q_descale"], k_descale=call["k_descale"], v_descale=call["v_descale"])
    tol = _tolerances().by_dtype[f"{q_dtype}/{kv_dtype}/{OUT_DTYPE_NAME}"]
    m = error_metrics(out, ref, tol["atol"], tol["rtol"])
    verdict = tolerance_rule(m, tol)
    del ref
    finite = lambda x: x if math.isfinite(x) else None  # noqa: E731  (JSON has no NaN)
    return {"max_abs_err": finite(m["max_abs_err"]), "mean_abs_err": finite(m["mean_abs_err"]),
            "tol_ratio": finite(verdict["ratio"]), "n_beyond_tol": m["n_beyond_tol"], "n_nan": m["n_nan"],
            "tolerance": tol, "passed": verdict["passed"], "sequences_checked": n_check, "of": shape.num_seqs}


def run_row(shape: Shape, q_dtype: str, kv_dtype: str, *, device: torch.device, ceilings: dict,
            quick: bool, seed: int, sdpa_cache: dict, want_compile_facts: bool,
            attention: Callable = unified_attention) -> Tuple[dict, Optional[dict]]:
    on_gpu = device.type == "cuda"
    q_size, kv_size, out_size = DTYPES[q_dtype].itemsize, DTYPES[kv_dtype].itemsize, OUT_DTYPE.itemsize
    nbytes = attention_bytes(shape.seqs, NUM_Q_HEADS, NUM_KV_HEADS, HEAD_SIZE, q_size, kv_size, out_size)
    flops = attention_flops(shape.seqs, NUM_Q_HEADS, HEAD_SIZE, shape.causal)
    fp8_math = q_dtype == "fp8" and kv_dtype == "fp8"
    matmul_key = "fp8_matmul_tflops" if fp8_math else "bf16_matmul_tflops"
    row = {
        "id": row_id(shape, q_dtype, kv_dtype), "kind": shape.kind, "shape": shape.label,
        "q_dtype": q_dtype, "kv_dtype": kv_dtype, "out_dtype": "bf16",
        "num_seqs": shape.num_seqs, "q_len": max(shape.q_lens), "kv_len": max(shape.kv_lens),
        "seq_groups": [list(g) for g in shape.groups()], "block_size": shape.block_size,
        "heads": [NUM_Q_HEADS, NUM_KV_HEADS], "head_size": HEAD_SIZE,
        "bytes": nbytes, "kv_bytes": kv_cache_bytes(shape.seqs, NUM_KV_HEADS, HEAD_SIZE, kv_size), "flops": flops,
        "status": "error", "error": None, "copies": None, "check": None,
        "median_us": None, "eager_us": None, "host_us": None, "achieved_tbps": None, "bandwidth_fraction": None,
        "achieved_tflops": None, "flop_ceiling": matmul_key, "flop_fraction": None,
        "floor_us": None, "floor_bound": None, "time_over_floor": None,
        "sdpa_us": None, "sdpa_gqa": None, "time_vs_sdpa": None,
    }
    compile_facts = None
    calls: List[dict] = []
    try:
        copies = rotating_copies(shape, q_dtype, kv_dtype, quick)
        row["copies"] = copies
        calls = build_calls(shape, q_dtype, kv_dtype, copies, device, seed)
        row["check"] = check_row(shape, q_dtype, kv_dtype, calls, device, seed, attention)
        _free(device)
        if not row["check"]["passed"]:
            row["status"] = "check_failed"
            return row, None
        if want_compile_facts:
            compile_facts = compiled_kernel_facts(calls[0], attention) if on_gpu else \
                {"error": "no compiled kernel under Triton's interpreter"}
            compile_facts["row"] = row["id"]

        rotation = itertools.cycle(calls)
        eager_us = time_us(lambda: attention(**next(rotation)), on_gpu)
        us = graph_time_us([lambda c=c: attention(**c) for c in calls]) if on_gpu else eager_us
        row["median_us"], row["eager_us"] = us, eager_us
        if on_gpu:
            row["host_us"] = host_time_us(lambda: attention(**calls[0]), reps=100)
        row["achieved_tbps"] = nbytes / (us * 1e-6) / 1e12
        row["achieved_tflops"] = flops / (us * 1e-6) / 1e12
        copy_tbps, matmul_tflops = ceilings.get("copy_tbps"), ceilings.get(matmul_key)
        row["bandwidth_fraction"] = _ratio(row["achieved_tbps"], copy_tbps)
        row["flop_fraction"] = _ratio(row["achieved_tflops"], matmul_tflops)
        if copy_tbps and matmul_tflops:
            memory_us = nbytes / (copy_tbps * 1e12) * 1e6
            compute_us = flops / (matmul_tflops * 1e12) * 1e6
            row["floor_us"] = max(memory_us, compute_us)
            row["floor_bound"] = "memory" if memory_us >= compute_us else "compute"
            row["time_over_floor"] = us / row["floor_us"]

        if on_gpu:
            key = shape.seqs  # SDPA's time depends on the shape only, not on block size or dtype config
            if key not in sdpa_cache:
                sdpa_fn, gqa = build_sdpa(shape, calls[0])
                try:
                    sdpa_us = graph_time_us([sdpa_fn])  # timed as the kernel is, launch cost excluded
                except RuntimeError:  # an SDPA backend that cannot be captured: eager
                    sdpa_us = time_us(sdpa_fn, True)
                sdpa_cache[key] = (sdpa_us, gqa)
                del sdpa_fn
            row["sdpa_us"], row["sdpa_gqa"] = sdpa_cache[key]
            row["time_vs_sdpa"] = _ratio(us, row["sdpa_us"])
        row["status"] = "ok"
    except Exception as exc:  # noqa: BLE001  (one shape failing, e.g. out of memory, must not end the run)
        row["error"] = f"{type(exc).__name__}: {exc}"[:500]
    finally:
        del calls
        _free(device)
    return row, compile_facts


# ----------------------------------------------------------------------------- bars
def evaluate_bars(rows: List[dict], timings_are_speed: bool = True) -> dict:
    """The project's targets, each {"target", "measured", "met", ...}; a bar whose rows did not
    all run and pass is not met, nor is any bar when the times come from the interpreter."""
    by_key = {(r["kind"], r["shape"], r["block_size"], r["q_dtype"], r["kv_dtype"]): r for r in rows}

    def pick(pred) -> List[dict]:
        return [r for r in rows if pred(r)]

    def bar(description, target, comparison, selected, value, worst=min):
        entry = {"description": description, "target": target, "comparison": comparison,
                 "measured": None, "met": False, "rows": [r["id"] for r in selected], "worst_row": None}
        if not selected:
            entry["note"] = "no row of this bar was run"
            return entry
        if not timings_are_speed:
            entry["note"] = "not evaluated: times under Triton's interpreter are not GPU speed"
            return entry
        bad = [r["id"] for r in selected if r["status"] != "ok"]
        values = [(value(r), r["id"]) for r in selected if r["status"] == "ok"]
        values = [(v, i) for v, i in values if v is not None]
        if values:
            entry["measured"], entry["worst_row"] = worst(values)
            ok = entry["measured"] >= target if comparison == ">=" else entry["measured"] < target
            entry["met"] = bool(ok) and not bad and len(values) == len(selected)
        if bad:
            entry["note"] = f"rows not measured: {', '.join(bad)}"
        elif len(values) < len(selected):
            entry["note"] = "some rows lack the ceiling or partner row this bar needs"
        return entry

    def big_decode(r):
        return r["kind"] == "decode" and r["num_seqs"] >= 64 and r["kv_len"] >= 4096

    def bf16_partner(r) -> Optional[dict]:
        return by_key.get((r["kind"], r["shape"], r["block_size"], "bf16", "bf16"))

    def fp8_over_bf16_time(r):
        partner = bf16_partner(r)
        return _ratio(r["median_us"], partner["median_us"]) if partner and partner["status"] == "ok" else None

    def bf16_over_fp8_time(r):
        partner = bf16_partner(r)
        return _ratio(partner["median_us"], r["median_us"]) if partner and partner["status"] == "ok" else None

    fp8_cache_decode = pick(lambda r: big_decode(r) and r["kv_dtype"] == "fp8")
    return {
        "decode_fp8_cache_bandwidth": bar(
            "decode with an FP8 cache, batches >= 64 x 4k: fraction of copy bandwidth (worst row)",
            0.80, ">=", fp8_cache_decode, lambda r: r["bandwidth_fraction"]),
        "decode_fp8_cache_faster_than_bf16": bar(
            "decode with an FP8 cache, batches >= 64 x 4k: time / time with a bf16 cache (worst row)",
            1.0, "<", fp8_cache_decode, fp8_over_bf16_time, worst=max),
        "decode_bf16_cache_bandwidth": bar(
            "decode with a bf16 cache, batches >= 64 x 4k: fraction of copy bandwidth (worst row)",
            0.90, ">=", pick(lambda r: big_decode(r) and r["kv_dtype"] == "bf16"), lambda r: r["bandwidth_fraction"]),
        "decode_single_32k_bandwidth": bar(
            "decode of one 32k sequence, every dtype config: fraction of copy bandwidth (worst row)",
            0.50, ">=", pick(lambda r: r["kind"] == "decode" and r["num_seqs"] == 1 and r["kv_len"] == 32768),
            lambda r: r["bandwidth_fraction"]),
        "prefill_bf16_4x4k_tflops": bar(
            "causal prefill 4 x 4096, bf16 q and cache: TFLOP/s (worst block size)",
            250.0, ">=", pick(lambda r: r["kind"] == "prefill" and r["shape"] == "4x4096"
                              and r["q_dtype"] == r["kv_dtype"] == "bf16"), lambda r: r["achieved_tflops"]),
        "prefill_fp8_speedup": bar(
            "causal prefill, FP8 q and cache: speedup over bf16 q and cache on the same shape (worst row)",
            1.3, ">=", pick(lambda r: r["kind"] == "prefill" and r["q_dtype"] == r["kv_dtype"] == "fp8"),
            bf16_over_fp8_time),
    }


# ----------------------------------------------------------------------------- output
def _clean(x):
    """JSON-safe: non-finite floats become null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def print_table(result: dict) -> None:
    from tabulate import tabulate
    table = []
    for r in result["rows"]:
        check = r["check"] or {}
        err = fmt(check.get("max_abs_err"), ".1e")
        ratio = fmt(check.get("tol_ratio"), ".2f")
        table.append([r["id"], r["status"] if r["status"] != "ok" else "", fmt(r["median_us"], ".1f"),
                      fmt(r.get("eager_us"), ".1f"),
                      fmt(r["achieved_tbps"], ".2f"), fmt(r["bandwidth_fraction"], ".0%"),
                      fmt(r["achieved_tflops"], ".0f"), fmt(r["flop_fraction"], ".0%"),
                      fmt(r["time_over_floor"], ".2f"), fmt(r["time_vs_sdpa"], ".2f"), err, ratio])
    print(tabulate(table, headers=["row", "", "us", "eager us", "TB/s", "of copy", "TFLOP/s", "of mm", "x floor",
                                   "x SDPA", "err", "err/tol"], disable_numparse=True))
    c = result["ceilings"]
    print(f"\nceilings: copy {fmt(c.get('copy_tbps'), '.2f')} TB/s, bf16 matmul "
          f"{fmt(c.get('bf16_matmul_tflops'), '.0f')} TFLOP/s, fp8 matmul {fmt(c.get('fp8_matmul_tflops'), '.0f')} TFLOP/s")
    bars = [[name, f"{b['comparison']} {b['target']}", fmt(b["measured"], ".3f"), "yes" if b["met"] else "NO"]
            for name, b in result["bars"].items()]
    print(tabulate(bars, headers=["bar", "target", "measured", "met"], disable_numparse=True))


def plot(result: dict, path: Path) -> None:
    """Fraction of the ceiling per shape (bandwidth for decode and mixed, FLOPs for prefill),
    bars grouped by dtype config, target lines; raw TB/s and TFLOP/s when no ceilings exist."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ceilings = result["ceilings"]
    have_ceilings = ceilings.get("copy_tbps") is not None
    configs = [f"q={q} kv={kv}" for q, kv in DTYPE_CONFIGS]
    panels = [("memory-bound: decode, mixed", lambda r: r["kind"] != "prefill",
               "bandwidth_fraction" if have_ceilings else "achieved_tbps",
               "fraction of copy bandwidth" if have_ceilings else "TB/s (no ceiling measured)"),
              ("compute-bound: causal prefill", lambda r: r["kind"] == "prefill",
               "flop_fraction" if have_ceilings else "achieved_tflops",
               "fraction of matmul TFLOP/s (fp8 mm for q=fp8 kv=fp8)" if have_ceilings else "TFLOP/s (no ceiling measured)")]
    fig, axes = plt.subplots(1, 2, figsize=(16, 6), gridspec_kw={"width_ratios": [2.5, 1]})
    for ax, (title, keep, metric, ylabel) in zip(axes, panels):
        rows = [r for r in result["rows"] if keep(r)]
        shapes = list(dict.fromkeys(f"{r['kind']} {r['shape']} bs{r['block_size']}" for r in rows))
        width = 0.8 / len(configs)
        for i, cfg in enumerate(configs):
            values = []
            for s in shapes:
                match = [r for r in rows if f"{r['kind']} {r['shape']} bs{r['block_size']}" == s
                         and f"q={r['q_dtype']} kv={r['kv_dtype']}" == cfg]
                values.append(match[0][metric] if match and match[0][metric] is not None else 0.0)
            ax.bar([x + (i - 1) * width for x in range(len(shapes))], values, width, label=cfg)
        if have_ceilings and keep({"kind": "decode"}):
            for y, text, style in ((0.80, "FP8 cache >= 64x4k: 0.80", "--"), (0.90, "bf16 cache >= 64x4k: 0.90", ":"),
                                   (0.50, "single 32k: 0.50", "-.")):
                ax.axhline(y, color="gray", linestyle=style, linewidth=1, label=text)
        if have_ceilings and not keep({"kind": "decode"}) and ceilings.get("bf16_matmul_tflops"):
            ax.axhline(250.0 / ceilings["bf16_matmul_tflops"], color="gray", linestyle="--", linewidth=1,
                       label="bf16 4x4k: 250 TFLOP/s")
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes, rotation=40, ha="right", fontsize=8)
        ax.set_ylim(top=ax.get_ylim()[1] * 1.3)  # room for the legend above the bars
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    fig.suptitle(f"{result.get('kernel') or DEFAULT_KERNEL} on {result['device']}  "
                 f"(32 q / 8 kv heads, head 128, out bf16)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def kernel_identity(spec: str = DEFAULT_KERNEL, attention: Callable = unified_attention) -> dict:
    """What was measured: the kernel (MODULE:FUNCTION), a hash of its module's source (others may
    edit it between runs), this checkout's git commit, and whether kernel/ (for another kernel:
    its file, where this checkout tracks it) differs from it; null where unknown."""
    facts = {"kernel": spec, "kernel_sha256": None, "commit": None, "kernel_modified": None}
    try:
        source = Path(inspect.getsourcefile(sys.modules[attention.__module__])).resolve()
        facts["kernel_sha256"] = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    except Exception:  # noqa: BLE001  (a kernel without a Python source file)
        source = None
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True,  # noqa: E731
                                        timeout=10, check=True).stdout.strip()
        facts["commit"] = git("rev-parse", "HEAD")
        if spec == DEFAULT_KERNEL:
            facts["kernel_modified"] = bool(git("status", "--porcelain", "--", "kernel"))
        elif source is not None and source.is_relative_to(ROOT) and git("ls-files", "--", str(source)):
            facts["kernel_modified"] = bool(git("status", "--porcelain", "--", str(source)))
    except Exception:  # noqa: BLE001  (no git, or not a checkout)
        pass
    return facts


NOTES = {
    "median_us": "GPU time per call: the rotating copies' calls captured in one CUDA graph, replayed by "
                 "do_bench (median, L2 flushed between replays); the host's launch cost is excluded, as in "
                 "a serving engine's graph-captured decode step",
    "eager_us": "do_bench of the plain Python call: where it exceeds median_us, the host's argument checks "
                "and launches (host_us per call) outlast the GPU work",
    "bytes": "K and V read (sum of kv_len * kv_heads * head_size * elem_size * 2) plus q read and out written",
    "flops": "4 * q_heads * head_size * sum of attended query-key pairs (causal triangle for prefill)",
    "floor_us": "max(bytes / copy bandwidth, flops / matmul rate); fp8 matmul for q=fp8 kv=fp8, bf16 otherwise",
    "sdpa": "torch SDPA on contiguous bf16 copies of the same data, timed once per shape: its K/V bytes "
            "are bf16, twice an FP8 cache's; time_vs_sdpa = median_us / sdpa_us (< 1: the kernel is faster)",
    "copies": "each row rotates this many input copies, one per call, so the bytes cycled exceed L2",
    "check": "the output against reference.paged_attention_ref under cases/tolerances.yaml's tolerance rule "
             "for the row's dtypes (tol_ratio: the worst element's or the mean's error over its bound); "
             "a failed check skips timing",
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes of every kind (runs under the interpreter)")
    parser.add_argument("--out", type=Path, default=Path("results/bench.json"))
    parser.add_argument("--plot", default="results/bench.png", help="PNG path ('' for none)")
    parser.add_argument("--filter", default="", help="run only rows whose id contains this (case-insensitive)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kernel", default=DEFAULT_KERNEL,
                        help=f"MODULE:FUNCTION or FILE.py:FUNCTION with vLLM's unified_attention keywords "
                             f"(default: {DEFAULT_KERNEL})")
    args = parser.parse_args(argv)

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    if not on_gpu and not args.quick:
        print("bench: the full benchmark needs a GPU; use --quick under the interpreter", file=sys.stderr)
        return 2

    try:
        attention = load_kernel(args.kernel)
    except ValueError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2

    shapes = quick_shapes() if args.quick else full_shapes()
    planned = [(s, q, kv) for s in shapes for q, kv in DTYPE_CONFIGS
               if args.filter.lower() in row_id(s, q, kv).lower()]
    if not planned:
        print(f"bench: no row matches --filter {args.filter!r}", file=sys.stderr)
        return 2

    if on_gpu:
        props = torch.cuda.get_device_properties(0)
        device_name = f"{props.name} ({props.multi_processor_count} SMs, L2 {getattr(props, 'L2_cache_size', 0) >> 20} MiB)"
        ceilings = measure_ceilings(device)
    else:
        device_name = "CPU (Triton interpreter)"
        ceilings = {"copy_tbps": None, "bf16_matmul_tflops": None, "fp8_matmul_tflops": None,
                    "errors": {"all": "not measured under the interpreter"}}

    identity = kernel_identity(args.kernel, attention)
    targets = compile_fact_targets(planned)
    rows, compile_facts, sdpa_cache = [], {}, {}

    def write_json() -> dict:
        result = _clean({
            "device": device_name,
            "backend": "cuda" if on_gpu else "triton-interpreter",
            "torch": torch.__version__, "triton": triton.__version__, **identity,
            "mode": "quick" if args.quick else "full", "filter": args.filter or None,
            "complete": len(rows) == len(planned),
            "timing": ({"method": "triton.testing.do_bench", **DO_BENCH} if on_gpu else
                       {"method": "wall clock under the interpreter (not GPU speed)", "reps": CPU_TIMING_REPS}),
            "notes": NOTES,
            "ceilings": ceilings,
            "compile": {kind: compile_facts.get(kind) for kind in ("decode", "prefill")},
            "rows": rows,
            "bars": evaluate_bars(rows, timings_are_speed=on_gpu),
        })
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
        return result

    for n, (shape, q_dtype, kv_dtype) in enumerate(planned):
        rid = row_id(shape, q_dtype, kv_dtype)
        start = time.perf_counter()
        row, facts = run_row(shape, q_dtype, kv_dtype, device=device, ceilings=ceilings, quick=args.quick,
                             seed=args.seed * 1000 + n, sdpa_cache=sdpa_cache,
                             want_compile_facts=rid in targets.values(), attention=attention)
        rows.append(row)
        if facts is not None:
            compile_facts[shape.kind] = facts
        print(f"[{n + 1}/{len(planned)}] {rid}: {row['status']} "
              f"{fmt(row['median_us'], '.1f')} us ({time.perf_counter() - start:.1f} s)"
              + (f"  {row['error']}" if row["error"] else ""), flush=True)
        write_json()  # after every row: a run cut short still leaves its rows
    sdpa_cache.clear()

    result = write_json()
    if args.plot:
        plot(result, Path(args.plot))
    print_table(result)
    print(f"\nwrote {args.out}" + (f" and {args.plot}" if args.plot else ""))
    failed = [r["id"] for r in rows if r["status"] != "ok"]
    if failed:
        print(f"bench: {len(failed)} row(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
