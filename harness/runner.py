"""Run cases: build inputs, call the kernel through vLLM's keywords, run the references, judge.

One case that raises, produces NaN or runs out of memory becomes an ERROR or FAIL row; the
others still run. Each result is appended to a JSON-lines file as soon as it is known, so an
interrupted run loses nothing finished.

On a GPU, a warm run is bound by the host: each case is a few hundred small tensor operations
and a few dozen waits for the device. `threads` > 1 judges that many cases at once, each thread on
its own CUDA stream, so that one thread's operations are issued while another waits (PyTorch
releases the GIL inside its operators). Triton's JIT is not thread-safe, so kernel launches take
a lock (harness.inputs.TRITON_LOCK): they are a small share of a warm case.
"""
from __future__ import annotations

import functools
import inspect
import json
import os
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from harness.inputs import TRITON_LOCK, AttentionInputs, build_inputs, e2e_key
from harness.metrics import (adaptive_rule, beyond_by_group, error_metrics, max_mean_err, rule_failure,
                             tolerance_rule)
from harness.schema import DEFAULT_KERNEL, Case, Result
from reference import paged_attention_ref, paged_attention_refs

# Set by `verify --jobs`: several worker processes share one device.
SHARED_DEVICE = os.environ.get("HARNESS_SHARED_DEVICE") == "1"
# CUDA errors after which a process's context is lost: every later call in it fails the same way.
DEVICE_LOST_ERRORS = ("illegal memory access", "illegal instruction", "misaligned address",
                      "unspecified launch failure", "device-side assert triggered", "hardware stack error",
                      "invalid program counter", "launch timed out")
# A finite poison for the second launch: elements still holding it were never written.
SENTINEL = -32768.0  # exact in bfloat16 and float16


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU interpreter"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def compiled_variants(kernel: Callable) -> Optional[dict]:
    """{Triton kernel: variants this process compiled or loaded} over the triton.jit functions of the
    module defining `kernel`; None where there are none (the interpreter compiles nothing)."""
    module = sys.modules.get(getattr(kernel, "__module__", None) or "")
    counts = {}
    for name, obj in (vars(module).items() if module else ()):
        caches = getattr(obj, "device_caches", None)  # a JITFunction's per-device compiled kernels
        if isinstance(caches, dict):
            n = sum(len(entry[0]) for entry in caches.values())
            if n:
                counts[name] = n
    return counts or None


@functools.lru_cache(maxsize=None)
def _parameters(kernel: Callable) -> frozenset:
    try:
        return frozenset(inspect.signature(kernel).parameters)
    except (TypeError, ValueError):
        return frozenset()


def _extra_kwargs(kernel: Callable, case: Case) -> dict:
    """Keywords beyond vLLM's that our kernel takes: the launch path and device-value validation."""
    params = _parameters(kernel)
    extra = {}
    if "split_kv" in params:
        extra["split_kv"] = case.path == "3d"
    if "validate" in params:
        extra["validate"] = True
    return extra


def _sync(device) -> None:
    # This thread's stream only: with several threads, the others' work is not this case's time.
    if torch.device(device).type == "cuda":
        torch.cuda.current_stream().synchronize()


@dataclass
class KernelOutput:
    """What one kernel wrote for a case's inputs, and how it behaved across launches."""
    out: torch.Tensor             # the first launch's output (NaN where it wrote nothing)
    n_unwritten: int = 0          # elements the second launch left at SENTINEL (0 when launched once)
    n_nondeterministic: int = 0   # elements that differ between the two launches


@dataclass
class References:
    """The three reference outputs a kernel's output is judged against."""
    ref: torch.Tensor             # quantization-aware reference on the kernel's own inputs
    e2e: torch.Tensor             # the same attention on the unquantized tensors
    lowp: torch.Tensor            # a plain implementation rounding where the kernel rounds


def prepare_inputs(case: Case, device: str, timings: dict) -> AttentionInputs:
    t0 = time.perf_counter()
    inputs = build_inputs(case, device)
    _sync(device)
    timings["inputs"] = time.perf_counter() - t0
    return inputs


def launch_kernel(kernel: Callable, inputs: AttentionInputs, device: str, timings: dict,
                  twice: bool = True) -> KernelOutput:
    """Run the kernel on the inputs; with twice, launch again to find unwritten and unstable elements."""
    kwargs = dict(inputs.kernel_kwargs, **_extra_kwargs(kernel, inputs.case))
    with TRITON_LOCK:
        # -- first launch: NaN poison; includes compilation of a new variant --
        t0 = time.perf_counter()
        out = inputs.fresh_out()
        kernel(**kwargs)
        _sync(device)
        timings["kernel_first"] = time.perf_counter() - t0
        first = out.clone()
        if not twice:
            return KernelOutput(first)

        # -- second launch: finite poison shows unwritten elements; outputs must be bitwise equal --
        if "validate" in kwargs:
            kwargs["validate"] = False  # the same device values, checked by the first launch
        out.fill_(SENTINEL)
        t0 = time.perf_counter()
        kernel(**kwargs)
        _sync(device)
        timings["kernel"] = time.perf_counter() - t0
    n_unwritten = int((out == SENTINEL).sum())
    both = torch.isfinite(first) & torch.isfinite(out)
    n_nondeterministic = int((first[both] != out[both]).sum())
    return KernelOutput(first, n_unwritten, n_nondeterministic)


class _E2ECache:
    """e2e references by harness.inputs.e2e_key: a matrix repeats each unquantized attention across
    its dtypes and scales (cases/default.yaml: 824 cases, 197 keys). Least recently used entries go
    beyond max_bytes. Thread-safe; an entry is put only once its stream has computed it."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries = {}
        self.bytes = 0
        self.lock = threading.Lock()

    def get(self, key) -> Optional[torch.Tensor]:
        with self.lock:
            out = self.entries.pop(key, None)
            if out is None:
                return None
            self.entries[key] = out  # most recently used last
        if out.is_cuda:
            out.record_stream(torch.cuda.current_stream())  # not reused while this stream reads it
        return out

    def put(self, key, out: torch.Tensor) -> None:
        with self.lock:
            if key in self.entries:
                return  # another thread computed it too
            self.entries[key] = out
            self.bytes += out.numel() * out.element_size()
            while self.bytes > self.max_bytes:
                old = self.entries.pop(next(iter(self.entries)))
                self.bytes -= old.numel() * old.element_size()


E2E_CACHE = _E2ECache(max_bytes=4 << 30)


def compute_references(inputs: AttentionInputs, device: str, timings: dict) -> References:
    t0 = time.perf_counter()
    ref, lowp = paged_attention_refs(**inputs.ref_kwargs, roundings=[None, inputs.lowp])  # one shared pass
    key = (e2e_key(inputs.case), str(device))
    e2e = E2E_CACHE.get(key)
    computed = e2e is None
    if computed:
        e2e = paged_attention_ref(**inputs.e2e_kwargs)
    _sync(device)
    if computed:
        E2E_CACHE.put(key, e2e)  # complete now: another thread's stream may read it
    refs = References(ref=ref, e2e=e2e, lowp=lowp)
    timings["reference"] = time.perf_counter() - t0
    return refs


def judge(case: Case, inputs: AttentionInputs, refs: References, got: KernelOutput, tol: dict,
          adaptive: dict, rules: list, device: str, timings: dict) -> Result:
    """Metrics and rule verdicts of one kernel output against the references."""
    m = error_metrics(got.out, refs.ref, tol["atol"], tol["rtol"])
    lowp_max, lowp_mean = max_mean_err(refs.lowp, refs.ref)
    e2e_max, e2e_mean = max_mean_err(refs.e2e, refs.ref)
    m.update(
        n_unwritten=got.n_unwritten, n_nondeterministic=got.n_nondeterministic,
        sat_q=inputs.saturated["q"], sat_k=inputs.saturated["k"], sat_v=inputs.saturated["v"],
        e2e_max_abs_err=e2e_max, e2e_mean_abs_err=e2e_mean,
        lowp_max_abs_err=lowp_max, lowp_mean_abs_err=lowp_mean,
    )
    if torch.device(device).type == "cuda" and "kernel" in timings:
        # One warm launch timed from the host (launch overhead included): a guide to where time
        # goes, not a speed figure; `make bench` times properly.
        m["kernel_ms"] = timings["kernel"] * 1e3
    verdicts = {
        "tolerance": tolerance_rule(m, tol),
        "adaptive": adaptive_rule(m, lowp_max, lowp_mean, adaptive),
    }
    m["adaptive_ratio"] = verdicts["adaptive"]["ratio"]
    m["mean_ratio"] = verdicts["tolerance"]["mean_ratio"]
    m.update(worst_element(case, m.pop("worst_index")))
    problems = [rule_failure(name, verdicts[name], m) for name in rules
                if not verdicts[name]["passed"]]
    if problems:
        if m["n_beyond_tol"]:
            m.update(beyond_by_group(got.out, refs.ref, tol["atol"], tol["rtol"], [q for q, _ in case.seq_lens],
                                     case.queries_per_kv))
            problems.append(describe_spread(m))
        problems.append(describe_worst(case, m))
    if m["n_nan"] or m["n_inf"]:
        problems.insert(0, f"{m['n_nan']} NaN / {m['n_inf']} Inf in the output")
    if got.n_unwritten:
        problems.insert(0, f"{got.n_unwritten} output elements never written")
    if got.n_nondeterministic:
        problems.append(f"{got.n_nondeterministic} elements differ between two identical launches")
    return Result(id=case.id, status="FAIL" if problems else "PASS", axes=case.axis_values(), metrics=m,
                  rules=verdicts, message="; ".join(problems), timings=timings)


def worst_element(case: Case, index) -> dict:
    """The worst element's place in the case's terms: sequence, query token within it, q head, dim."""
    token, head, dim = index
    for seq, (q_len, _) in enumerate(case.seq_lens):
        if token < q_len:
            return {"worst_seq": seq, "worst_query": token, "worst_head": head, "worst_dim": dim}
        token -= q_len
    raise ValueError(f"token index {index[0]} beyond the case's {sum(q for q, _ in case.seq_lens)} query tokens")


def _ranges(indices: list, most: int = 6) -> str:
    """[1, 2, 3, 7] -> '1-3, 7'; beyond `most` runs, the first ones and how many indices in all."""
    runs = []
    for i in indices:
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs[:most])
    return text + (f", ... ({len(indices)} in all)" if len(runs) > most else "")


def _which(counts, noun: str) -> str:
    hit = [i for i, n in enumerate(counts) if n]
    if len(hit) == len(counts):
        return f"all {len(counts)} {noun}s" if len(counts) > 1 else f"its one {noun}"
    return f"{noun}{'s' if len(hit) > 1 else ''} {_ranges(hit)} of {len(counts)}"


def describe_spread(m: dict) -> str:
    """Which sequences and kv heads hold elements beyond tolerance, e.g. 'sequences 1, 2 of 3, all 2 kv heads'."""
    return f"beyond in {_which(m['beyond_by_seq'], 'sequence')}, {_which(m['beyond_by_kv_head'], 'kv head')}"


def describe_worst(case: Case, m: dict) -> str:
    """One line that points a kernel engineer at the worst element, e.g. the block or mask boundary it sits on."""
    seq, query = m["worst_seq"], m["worst_query"]
    q_len, kv_len = case.seq_lens[seq]
    return (f"worst at sequence {seq} of {len(case.seq_lens)}, query {query} of {q_len} "
            f"(key {kv_len - q_len + query} of {kv_len}), q head {m['worst_head']} "
            f"(kv {m['worst_head'] // case.queries_per_kv}), dim {m['worst_dim']}: got {m['worst_got']:.4g}, want {m['worst_want']:.4g}")


def lost_the_device(result: Result) -> bool:
    """The case ended in an error that leaves this process's CUDA context unusable."""
    return result.status == "ERROR" and any(e in result.message for e in DEVICE_LOST_ERRORS)


def error_result(case: Case, stage: str, e: Exception, timings: dict) -> Result:
    """The ERROR row for an exception raised at `stage`."""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        torch.cuda.empty_cache()
    first_line = (str(e).strip().splitlines() or [""])[0]
    return Result(id=case.id, status="ERROR", axes=case.axis_values(),
                  message=f"{stage}: {type(e).__name__}: {first_line}", timings=timings)


def run_case(case: Case, tol: dict, adaptive: dict, rules: list, kernel: Callable, device: str) -> Result:
    """Check one case; never raises."""
    timings = {}
    stage = "inputs"
    try:
        inputs = prepare_inputs(case, device, timings)
        stage = "kernel"
        got = launch_kernel(kernel, inputs, device, timings)
        stage = "reference"
        refs = compute_references(inputs, device, timings)
        stage = "metrics"
        return judge(case, inputs, refs, got, tol, adaptive, rules, device, timings)
    except Exception as e:  # one case's crash (OOM included) must not lose the others
        return error_result(case, stage, e, timings)


def _case_runner(tolerances, kernel: Callable, device: str, threads: int) -> Callable:
    """case -> Result; with threads on a GPU, each pool thread issues its work on a stream of its own."""
    def run(case):
        return run_case(case, tolerances.for_case(case), tolerances.adaptive, tolerances.rules, kernel, device)
    if threads <= 1 or torch.device(device).type != "cuda":
        return run
    local = threading.local()

    def run_on_own_stream(case):
        if not hasattr(local, "stream"):
            local.stream = torch.cuda.Stream()
        with torch.cuda.stream(local.stream):
            return run(case)
    return run_on_own_stream


def _completed(cases: list, run: Callable, threads: int, stop: Callable):
    """(position, result) of each case as it finishes; `threads` at a time. Once stop() is true,
    no further case starts (those already running finish and are yielded)."""
    if threads <= 1:
        for i, case in enumerate(cases):
            if stop():
                return
            yield i, run(case)
        return
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="case") as pool:
        pending, next_case = {}, 0
        while pending or (next_case < len(cases) and not stop()):
            while len(pending) < threads and next_case < len(cases) and not stop():
                pending[pool.submit(run, cases[next_case])] = next_case
                next_case += 1
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in sorted(done, key=pending.get):
                yield pending.pop(future), future.result()


def run_cases(cases: Iterable[Case], tolerances, kernel: Callable, device: str,
              jsonl_path: Optional[Path] = None, progress: Optional[bool] = None,
              stop_after: Optional[Callable] = None, threads: int = 1) -> list:
    """Run the cases, streaming each Result to jsonl_path as it finishes; results come back in the
    cases' order. The run ends early once stop_after(position, result) is true for a finished case,
    or once a case lost the device (with threads, the cases already running still finish)."""
    cases = list(cases)
    if progress is None:
        progress = sys.stderr.isatty()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(cases), unit="case", file=sys.stderr)
    by_position = {}
    stopping = False
    sink = open(jsonl_path, "a") if jsonl_path else None
    try:
        run = _case_runner(tolerances, kernel, device, threads)
        for i, result in _completed(cases, run, threads, stop=lambda: stopping):
            by_position[i] = result
            lost = lost_the_device(result)
            if lost or (stop_after and stop_after(i, result)):
                stopping = True
            if SHARED_DEVICE and torch.cuda.is_available() and not lost:
                torch.cuda.empty_cache()  # hand cached memory back to the other workers on this GPU
            if sink:
                sink.write(json.dumps(result.to_dict()) + "\n")
                sink.flush()
            if bar:
                bar.update(1)
                bar.set_postfix_str(f"{sum(r.status != 'PASS' for r in by_position.values())} not passing")
    finally:
        if sink:
            sink.close()
        if bar:
            bar.close()
    return [by_position[i] for i in sorted(by_position)]
