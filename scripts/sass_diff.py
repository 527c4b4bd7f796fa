"""Which of the kernel's default variants compile to other machine code than at a base revision:
the check to run before spending GPU time on a change meant to leave the code alone (a refactor),
or to see which variants a change touched. No GPU needed.

    python scripts/sass_diff.py BASE [--kinds decode,split,...] [--block-sizes 16,64] [--json]

BASE is a git revision (its kernel/ is read with git archive) or a folder holding
kernel/unified_attention.py. Each variant is the one launch_config picks for a batch kind of
scripts/sass_report.py (32 q / 8 kv heads, head 128) and a dtype pair (fp8/fp8, bf16/fp8,
bf16/bf16) and block size, compiled for sm_90 from both kernels; equal SASS digests mean the
same machine code. For a changed variant, registers, spilled bytes and tile-loop instructions
before and after. Exit status: 0 every variant compiles to the same code, 1 some changed, 2 bad
input. The base kernel must have compile_options (09aaaf2 or later).
"""
from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import sass_report as SR  # noqa: E402  (sets up compiling without a GPU)

DTYPE_PAIRS = (("fp8", "fp8"), ("bf16", "fp8"), ("bf16", "bf16"))


def base_kernel_file(base: str, workdir: Path) -> Path:
    """kernel/unified_attention.py of a folder, or of a git revision extracted into workdir."""
    folder = Path(base)
    if (folder / "kernel" / "unified_attention.py").is_file():
        return folder / "kernel" / "unified_attention.py"
    archive = subprocess.run(["git", "archive", base, "kernel"], cwd=ROOT, capture_output=True)
    if archive.returncode != 0:
        why = (archive.stderr.decode(errors="replace").strip().splitlines() or ["git archive failed"])[-1]
        raise ValueError(f"neither a folder with kernel/unified_attention.py nor a git revision ({why})")
    subprocess.run(["tar", "-x", "-C", str(workdir)], input=archive.stdout, check=True)
    return workdir / "kernel" / "unified_attention.py"


def load_base(base: str, workdir: Path):
    module = SR.load_kernel_module(base_kernel_file(base, workdir))
    if not hasattr(module, "compile_options"):
        raise ValueError("its kernel has no compile_options (older than 09aaaf2): its variants cannot be "
                         "compiled as its launcher would")
    return module


def facts(result: dict) -> dict:
    return {"digest": result["sass_digest"], "registers": result["registers"], "spill_stores": result["spill_stores"],
            "loop_instructions": result["tile_loop"]["instructions"], "config": result["config"]}


def compare(base_module, kinds, block_sizes) -> list:
    rows = []
    for kind, (q, kv), block_size in itertools.product(kinds, DTYPE_PAIRS, block_sizes):
        new = facts(SR.report(q, kv, 128, block_size, kind, {}))
        old = facts(SR.report(q, kv, 128, block_size, kind, {}, module=base_module))
        rows.append({"variant": f"{kind} q={q} kv={kv} bs={block_size}", "same": new["digest"] == old["digest"],
                     "base": old, "new": new})
    return rows


def configs_differ(base: dict, new: dict) -> bool:
    """LaunchConfigs differ in a field both kernels know (a field one version lacks is its default)."""
    return any(base[k] != new[k] for k in base.keys() & new.keys())


def render(rows: list, base: str) -> str:
    from tabulate import tabulate
    short = lambda f: f"{f['registers']} regs, {f['spill_stores']} B spilled, {f['loop_instructions']} in loop"  # noqa: E731
    table = [[r["variant"], "same code" if r["same"] else "CHANGED", "" if r["same"] else short(r["base"]),
              "" if r["same"] else short(r["new"]),
              "" if r["same"] or not configs_differ(r["base"]["config"], r["new"]["config"]) else "launch config differs"]
             for r in rows]
    changed = sum(not r["same"] for r in rows)
    return (tabulate(table, headers=["variant", "", f"base ({base})", "working tree", ""], disable_numparse=True)
            + f"\n\n{changed} of {len(rows)} variants compile to other code than at {base}\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="git revision, or a folder holding kernel/unified_attention.py")
    parser.add_argument("--kinds", default=",".join(SR.KINDS), help="batch kinds (default: all)")
    parser.add_argument("--block-sizes", default="16,64")
    parser.add_argument("--json", action="store_true", help="print the comparison as JSON")
    args = parser.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    if not kinds or any(k not in SR.KINDS for k in kinds):
        print(f"error: --kinds {args.kinds!r}: choose from {', '.join(SR.KINDS)}", file=sys.stderr)
        return 2
    try:
        block_sizes = [int(b) for b in args.block_sizes.split(",")]
    except ValueError:
        print(f"error: --block-sizes {args.block_sizes!r}: integers, e.g. 16,64", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        try:
            base_module = load_base(args.base, Path(tmp))
        except ValueError as e:
            print(f"error: {args.base}: {e}", file=sys.stderr)
            return 2
        rows = compare(base_module, kinds, block_sizes)
    print(json.dumps(rows, indent=1) if args.json else render(rows, args.base), end="" if not args.json else "\n")
    return 0 if all(r["same"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
