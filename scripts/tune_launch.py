"""Sweep launch configurations of the kernel on the GPU: the data behind `launch_config`.

    python scripts/tune_launch.py [--out tuning.json] [--filter SUBSTR]

For each benchmark shape and dtype config: the default configuration's GPU time (CUDA graph,
host launch cost excluded) and host time per call, then the split-KV segment count swept at
the default tiling, then warps x stages x tile at the best segment count, then (FP8-cache decode)
register cap x V as words at the best of those; with --grid, only that grid around the default.
Every configuration's
output is compared with the default's (a configuration that changes the numbers is reported,
not timed). Times are relative to the copy bandwidth measured at the start.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import run as bench  # noqa: E402
from kernel import LaunchConfig, unified_attention  # noqa: E402
from kernel.unified_attention import attention_kernel, default_launch_config  # noqa: E402

DECODE = [bench.decode(1, 32768, 16), bench.decode(64, 4096, 16), bench.decode(64, 4096, 64),
          bench.decode(8, 4096, 16), bench.decode(256, 1024, 16), bench.decode(64, 8192, 64)]
PREFILL = [bench.prefill(4, 4096, 64), bench.prefill(2, 1024, 64), bench.prefill(4, 4096, 16),  # and the mixed batch
           bench.prefill(1, 8192, 64), bench.mixed(2048, 2048, 64, 4096, 16)]
DTYPES = (("fp8", "fp8"), ("bf16", "fp8"), ("bf16", "bf16"))
SEGMENTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DECODE_GRID = dict(num_warps=(2, 4, 8), num_stages=(2, 3, 4), tile=(64, 128))
# FP8-cache decode, at the best of DECODE_GRID: the register cap and how V is read.
FP8_DECODE_GRID = dict(max_registers=(None, 128), v_as_words=(False, True))
PREFILL_GRID = dict(block_m=(64, 128), num_warps=(4, 8), num_stages=(2, 3), tile=(32, 64))
SAME_OUTPUT = 2e-2  # configurations reorder float32 sums only; outputs of size ~1 agree far closer


def measure(calls, config, expected):
    """{us, max_diff} of one configuration, or {error}."""
    try:
        out = calls[0]["out"]
        unified_attention(**calls[0], config=config)
        diff = float((out.float() - expected).abs().max())
        if not diff <= SAME_OUTPUT:
            return {"error": f"output differs from the default configuration's by {diff:.3g}"}
        us = bench.graph_time_us([lambda c=c: unified_attention(**c, config=config) for c in calls])
        facts = bench.compiled_kernel_facts(dict(calls[0], config=config)).get("kernels", {})
        main = facts.get(attention_kernel(config).fn.__name__, {})  # the attention kernel, not the reduction
        return {"us": us, "max_diff": diff, "n_regs": main.get("n_regs"), "n_spills": main.get("n_spills")}
    except Exception as exc:  # noqa: BLE001  (an invalid configuration, e.g. out of resources)
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}


def default_config(call: dict) -> LaunchConfig:
    """The configuration the kernel picks by itself for one of bench.build_calls' calls."""
    return default_launch_config(call["q"], call["k"], call["v"], call["seqused_k"], call["max_seqlen_q"],
                                 call["max_seqlen_k"])


def sweep(shape, q_dtype, kv_dtype, device, copy_tbps, only_grid=None):
    copies = bench.rotating_copies(shape, q_dtype, kv_dtype, quick=False)
    calls = bench.build_calls(shape, q_dtype, kv_dtype, copies, device, seed=0)
    nbytes = bench.attention_bytes(shape.seqs, bench.NUM_Q_HEADS, bench.NUM_KV_HEADS, bench.HEAD_SIZE,
                                   bench.DTYPES[q_dtype].itemsize, bench.DTYPES[kv_dtype].itemsize, 2)
    base = default_config(calls[0])
    unified_attention(**calls[0], config=base)
    expected = calls[0]["out"].float().clone()
    row = {"id": bench.row_id(shape, q_dtype, kv_dtype), "bytes": nbytes, "default": dataclasses.asdict(base),
           "host_us": bench.host_time_us(lambda: unified_attention(**calls[0])),
           "eager_us": bench.time_us(lambda: unified_attention(**calls[0]), True), "tried": []}

    def add(config):
        result = measure(calls, config, expected)
        entry = dict(dataclasses.asdict(config), **result)
        if "us" in result:
            entry["fraction_of_copy"] = nbytes / (result["us"] * 1e-6) / 1e12 / copy_tbps
        row["tried"].append(entry)
        return entry

    best = add(base)

    def around(start, grid):
        nonlocal best
        for values in itertools.product(*grid.values()):
            config = dataclasses.replace(start, **dict(zip(grid, values)))
            if config != start:
                e = add(config)
                if e.get("us", 1e30) < best.get("us", 1e30):
                    best = e

    decode = shape.kind == "decode"
    if only_grid:
        around(base, only_grid)
    else:
        if decode:
            around(base, {"num_segments": SEGMENTS})
        around(dataclasses.replace(base, num_segments=best["num_segments"]), DECODE_GRID if decode else PREFILL_GRID)
        if decode and kv_dtype == "fp8":
            around(LaunchConfig(**{f.name: best[f.name] for f in dataclasses.fields(LaunchConfig)}), FP8_DECODE_GRID)
    row["default_us"] = row["tried"][0].get("us")
    row["best"] = best
    del calls
    torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tuning.json"))
    parser.add_argument("--filter", default="")
    parser.add_argument("--grid", type=json.loads, default=None,
                        help='only this grid around each row\'s default configuration, as JSON: '
                             '\'{"num_stages": [3, 4], "tile": [32, 64]}\' (LaunchConfig fields)')
    parser.add_argument("--budget-s", type=float, default=1e9, help="stop starting new shapes after this")
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    start = time.time()
    ceilings = bench.measure_ceilings(device)
    result = {"ceilings": ceilings, "rows": []}
    for shape, (q_dtype, kv_dtype) in itertools.product(DECODE + PREFILL, DTYPES):
        if args.filter not in bench.row_id(shape, q_dtype, kv_dtype) or time.time() - start > args.budget_s:
            continue
        row = sweep(shape, q_dtype, kv_dtype, device, ceilings["copy_tbps"], args.grid)
        result["rows"].append(row)
        b, d = row["best"], row["tried"][0]
        print(f"{row['id']:<42} host {row['host_us']:6.1f} us  eager {row['eager_us']:8.1f} us  "
              f"default {d.get('us', float('nan')):8.1f} us ({d.get('fraction_of_copy', 0):.2f})  "
              f"best {b.get('us', float('nan')):8.1f} us ({b.get('fraction_of_copy', 0):.2f}) "
              f"seg={b['num_segments']} w={b['num_warps']} s={b['num_stages']} tile={b['tile']} "
              f"bm={b['block_m']}  [{time.time() - start:.0f} s]", flush=True)
        args.out.write_text(json.dumps(result, indent=1))
        if args.grid:
            for t in row["tried"]:  # the first is the default; the grid's fields name the rest
                knobs = " ".join(f"{k}={t[k]}" for k in args.grid)
                print(f"    {knobs}: {t.get('us', float('nan')):7.1f} us ({t.get('fraction_of_copy', 0):.3f}) "
                      f"n_regs={t.get('n_regs')} spills={t.get('n_spills')} {t.get('error', '')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
