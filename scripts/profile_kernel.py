"""Launch the attention kernel on one benchmark batch a few times, for a profiler to observe (GPU).

    ncu --clock-control none --kernel-name regex:_unified_attention --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section WarpStateStats python scripts/profile_kernel.py decode 64 4096 16 --q fp8 --kv fp8
    python scripts/profile_kernel.py decode 64 4096 64 --q fp8 --kv fp8 --config '{"v_as_words": false}'

Builds the batch exactly as `make bench` does (bench.run.build_calls, one copy: a decode batch of
64 x 4096 is hundreds of MB, far beyond the L2), checks nothing and times nothing itself: the
first launch compiles, the rest are what the profiler should look at. Prints the launch
configuration, so a profile names what it measured.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import run as bench  # noqa: E402
from kernel import unified_attention  # noqa: E402
from scripts.tune_launch import default_config  # noqa: E402

SHAPES = {"decode": bench.decode, "prefill": bench.prefill}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("kind", choices=sorted(SHAPES))
    parser.add_argument("num_seqs", type=int)
    parser.add_argument("length", type=int, help="kv length (decode) or sequence length (prefill)")
    parser.add_argument("block_size", type=int)
    parser.add_argument("--q", choices=sorted(bench.DTYPES), default="fp8")
    parser.add_argument("--kv", choices=sorted(bench.DTYPES), default="fp8")
    parser.add_argument("--config", default="{}", help="LaunchConfig fields to override, as JSON")
    parser.add_argument("--launches", type=int, default=4)
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the CPU: Triton's interpreter
    shape = SHAPES[args.kind](args.num_seqs, args.length, args.block_size)
    call = bench.build_calls(shape, args.q, args.kv, 1, device, seed=0)[0]
    config = default_config(call)
    config = dataclasses.replace(config, **json.loads(args.config))
    print(f"{args.kind} {shape.label} bs={shape.block_size} q={args.q} kv={args.kv} {dataclasses.asdict(config)}")
    for _ in range(args.launches):
        unified_attention(**call, config=config)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
