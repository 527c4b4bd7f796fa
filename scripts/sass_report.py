"""Compile one variant of the attention kernel for the H100/H200 (sm_90) without a GPU, and report
what decides its speed before any device time is spent: registers, spills, shared memory, the
K/V buffers Triton's software pipeliner allocates, and the instruction mix of the tile loop.

    python scripts/sass_report.py --q fp8 --kv fp8 --block-size 16 --decode
    python scripts/sass_report.py --q bf16 --kv bf16 --prefill --config '{"num_stages": 3}' [--json] [--dump DIR]

The variant is the one `kernel.launch_config` picks for one of the benchmark's batches (KINDS:
64 x 4096 decode, one 32k decode on the split-KV path, a chunked prefill beside 64 decodes, a
4 x 4096 causal prefill) or for one 128k decode, 32 q / 8 kv heads, with --config overriding
LaunchConfig fields. An FP8 cache's decode kinds run the one-warp TMA kernel; --decode-no-tma and
--split-no-tma pick the 4-warp kernel's variants that caches TMA cannot read take (the 128k
decode's split-KV segments there take its whole-sequence form).
Uses Triton's bundled ptxas and nvdisasm; runs on a CPU-only machine. The loop's instruction
count is per warp and tile: the tile loop is the largest backward branch of the SASS.
scripts/sass_diff.py compares these variants between two versions of the kernel.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # compile for the GPU even without one (kernel/ would pick the interpreter)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler.compiler import ASTSource  # noqa: E402

from harness.kernels import import_file  # noqa: E402

ua = importlib.import_module("kernel.unified_attention")  # the module (the package exports the function)

DTYPES = {"fp8": (torch.float8_e4m3fn, "fp8e4nv"), "bf16": (torch.bfloat16, "bf16"), "fp16": (torch.float16, "fp16")}
TARGET = GPUTarget("cuda", 90, 32)
NUM_Q_HEADS, NUM_KV_HEADS = 32, 8
# Pointer and stride arguments the launcher passes are 16-byte aligned / multiples of 16 in every
# benchmark shape; Triton specializes on that at run time, so the report does too.
ALIGNED_INTS = ("stride_q_tok", "stride_q_head", "stride_o_tok", "stride_o_head", "stride_k_blk",
                "stride_k_tok", "stride_k_head", "stride_v_blk", "stride_v_tok", "stride_v_head")


# The benchmark's batches (bench.run), as launch_config sees them: (num_seqs, max query length,
# max kv length, query tokens).
KINDS = {
    "decode": (64, 1, 4096, 64),
    "split": (1, 1, 32768, 1),                 # one long decode: the split-KV path
    "long_split": (1, 1, 131072, 1),
    "mixed": (65, 2048, 4096, 2048 + 64),      # a 2048-token chunk beside 64 decodes
    "prefill": (4, 4096, 4096, 4 * 4096),
    # the decode and split kinds against caches TMA cannot read (layout=strided): the 4-warp kernel
    "decode_no_tma": (64, 1, 4096, 64),
    "split_no_tma": (1, 1, 32768, 1),
    "long_split_no_tma": (1, 1, 131072, 1),    # segments of >= 16 tiles: the whole-sequence form
}
NO_TMA_KINDS = ("decode_no_tma", "split_no_tma", "long_split_no_tma")


def load_kernel_module(path: Path):
    """A kernel/unified_attention.py from elsewhere (another revision), under a name of its own."""
    return import_file(path, f"_kernel_at_{abs(hash(str(path.resolve())))}")


def variant(q: str, kv: str, head_size: int, block_size: int, kind: str, overrides: dict, module=None):
    """(LaunchConfig, compile options) the launcher would use for this batch kind."""
    module = module or ua
    num_seqs, q_len, kv_len, num_tokens = KINDS[kind]
    no_tma = {"tma_readable": False} if kind in NO_TMA_KINDS and "tma_readable" in \
        inspect.signature(module.launch_config).parameters else {}  # kernels before TMA: none to turn off
    config = module.launch_config(max_seqlen_q=q_len, max_seqlen_k=kv_len, num_tokens=num_tokens, num_seqs=num_seqs,
                                  num_kv_heads=NUM_KV_HEADS, queries_per_kv=NUM_Q_HEADS // NUM_KV_HEADS,
                                  head_size=head_size, block_size=block_size, q_fp8=q == "fp8", kv_fp8=kv == "fp8",
                                  device=torch.device("cpu"), **no_tma)  # stands in 132 SMs, as the H100 and H200 have
    config = dataclasses.replace(config, **overrides)
    options = module.compile_options(DTYPES[q][0], DTYPES[kv][0], head_size, block_size, config, causal=True,
                                     use_window=False, use_softcap=False,
                                     v_words_readable=kv == "fp8" and head_size % 4 == 0, interpret=False)
    return config, options


def compile_variant(q: str, kv: str, options: dict, module=None, config=None):
    module = module or ua
    tma = bool(config is not None and getattr(config, "tma_decode", False))
    fn = module.attention_kernel(config) if tma else module._unified_attention_kernel
    launch = {k: options.pop(k) for k in ("num_warps", "num_stages", "maxnreg") if k in options}
    signature = {name: "i32" for name in fn.arg_names}
    signature.update({"out_ptr": "*bf16", "q_ptr": "*" + DTYPES[q][1], "k_ptr": "*" + DTYPES[kv][1],
                      "v_ptr": "*" + DTYPES[kv][1], "softmax_scale": "fp32", "softcap": "fp32"})
    if tma:  # K and V come as TMA descriptors of [1, tile, 1, head_pad] boxes
        box = f"tensordesc<{DTYPES[kv][1]}[1, {options['TILE']}, 1, {options['HEAD_PAD']}]>"
        signature.update({"k_desc": box, "v_desc": box})
    for name in ("seg_acc_ptr", "seg_max_ptr", "seg_sum_ptr", "q_scale_ptr", "k_scale_ptr", "v_scale_ptr"):
        signature[name] = "*fp32"
    for name in ("block_table_ptr", "seqused_k_ptr", "cu_seqlens_q_ptr"):
        signature[name] = "*i32"
    signature.update({name: "constexpr" for name in options})
    signature = {name: signature[name] for name in fn.arg_names}  # this kernel's arguments alone
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]]
             for n in fn.arg_names if signature[n].startswith("*") or n in ALIGNED_INTS}
    return triton.compile(ASTSource(fn, signature, options, attrs), target=TARGET, options=launch)


def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def ptxas_usage(ptx: str) -> dict:
    """Registers and spill bytes as ptxas reports them for this PTX (its .maxnreg included)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ptx"
        path.write_text(ptx)
        log = subprocess.run([_tool("ptxas"), "-arch=sm_90a", "-v", str(path), "-o", str(Path(tmp) / "k.o")],
                             capture_output=True, text=True, check=True).stderr
    number = lambda pattern: int(m.group(1)) if (m := re.search(pattern, log)) else None  # noqa: E731
    return {"registers": number(r"Used (\d+) registers"), "spill_stores": number(r"(\d+) bytes spill stores"),
            "spill_loads": number(r"(\d+) bytes spill loads"), "stack_frame": number(r"(\d+) bytes stack frame")}


def disassemble(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool("nvdisasm"), "-c", f.name], capture_output=True, text=True, check=True).stdout


def sass_digest(sass: str) -> str:
    """A digest of the instructions alone (addresses dropped): equal digests, the same machine code."""
    lines = [re.sub(r"/\*[0-9a-f]{4,}\*/", "", line).strip() for line in sass.splitlines()
             if re.match(r"\s+/\*[0-9a-f]{4}\*/", line)]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def _mix(body: list) -> collections.Counter:
    mix = collections.Counter()
    for text in body:
        op = re.sub(r"^\s+/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?", "", text).split()[0]
        mix[op if op.startswith(("IMAD.MOV", "LDS.U8")) else op.split(".")[0]] += 1
    return mix


# Matrix instructions: 16-bit (Ampere-style, Hopper's warpgroup) and FP8 (warpgroup) MMAs.
MATRIX_OPS = ("HMMA", "HGMMA", "QGMMA")


def tile_loop_mix(sass: str) -> dict:
    """Instruction count and mix, per warp and iteration, of the tile loop: the first loop (in
    program order) that issues matrix instructions. With unmasked_tiles the kernel has two or three
    such loops and the first is the one whole tiles run through; `loops` counts each of them."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
    instructions = [(i, line) for i, line in enumerate(lines) if re.match(r"\s+/\*[0-9a-f]{4}\*/", line)]
    loops = []
    for i, line in instructions:
        m = re.search(r"BRA\s+`\((\.L_x_\d+)\)", line)
        if m and labels.get(m.group(1), i) < i:
            body = [text for j, text in instructions if labels[m.group(1)] < j <= i]
            if any(op in text for text in body for op in MATRIX_OPS):
                loops.append((labels[m.group(1)], body))
    loops.sort(key=lambda start_body: start_body[0])
    mix = _mix(loops[0][1]) if loops else collections.Counter()
    return {"instructions": sum(mix.values()), "mix": dict(mix.most_common()),
            "loops": [len(body) for _, body in loops]}


def pipelined_buffers(ttgir: str) -> list:
    """Shapes of the shared-memory buffers the pipeliner allocates, e.g. '2x128x64xf8E4M3FN':
    the leading number is how many tiles of that load are in flight."""
    return re.findall(r"ttg\.local_alloc : \(\) -> !ttg\.memdesc<([^,>]+)", ttgir)


def report(q: str, kv: str, head_size: int, block_size: int, kind: str, overrides: dict,
           dump: Path | None = None, module=None) -> dict:
    config, options = variant(q, kv, head_size, block_size, kind, overrides, module)
    compiled = compile_variant(q, kv, dict(options), module, config)
    if dump:
        dump.mkdir(parents=True, exist_ok=True)
        for ext in ("ttgir", "ptx"):
            (dump / f"kernel.{ext}").write_text(compiled.asm[ext])
        (dump / "kernel.cubin").write_bytes(compiled.asm["cubin"])
    sass = disassemble(compiled.asm["cubin"])
    return {"q": q, "kv": kv, "head_size": head_size, "block_size": block_size,
            "kind": kind, "config": dataclasses.asdict(config), "sass_digest": sass_digest(sass),
            "shared_bytes": compiled.metadata.shared, **ptxas_usage(compiled.asm["ptx"]),
            "buffers": pipelined_buffers(compiled.asm["ttgir"]), "tile_loop": tile_loop_mix(sass)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--q", choices=DTYPES, default="fp8")
    parser.add_argument("--kv", choices=DTYPES, default="fp8")
    parser.add_argument("--head-size", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--decode", dest="kind", action="store_const", const="decode", help="64 x 4096 decode (default)")
    kind.add_argument("--split", dest="kind", action="store_const", const="split", help="one 32k decode, split-KV")
    kind.add_argument("--long-split", dest="kind", action="store_const", const="long_split",
                      help="one 128k decode on the split-KV path")
    kind.add_argument("--mixed", dest="kind", action="store_const", const="mixed",
                      help="a 2048-token chunk beside 64 decodes of 4096")
    kind.add_argument("--prefill", dest="kind", action="store_const", const="prefill", help="4 x 4096 causal prefill")
    kind.add_argument("--decode-no-tma", dest="kind", action="store_const", const="decode_no_tma",
                      help="64 x 4096 decode, caches TMA cannot read (the 4-warp kernel)")
    kind.add_argument("--split-no-tma", dest="kind", action="store_const", const="split_no_tma",
                      help="one 32k decode, caches TMA cannot read (the 4-warp kernel's split-KV)")
    kind.add_argument("--long-split-no-tma", dest="kind", action="store_const", const="long_split_no_tma",
                      help="one 128k decode, caches TMA cannot read (segments in the whole-sequence form)")
    parser.set_defaults(kind="decode")
    parser.add_argument("--config", type=json.loads, default={}, help="LaunchConfig fields to override, as JSON")
    parser.add_argument("--dump", type=Path, help="write the TTGIR, PTX and cubin here")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    result = report(args.q, args.kv, args.head_size, args.block_size, args.kind, args.config, args.dump)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    loop = result["tile_loop"]
    print(f"{result['kind']} q={args.q} kv={args.kv} d={args.head_size} bs={args.block_size}  {result['config']}")
    print(f"registers {result['registers']}  spill stores/loads {result['spill_stores']}/{result['spill_loads']} B  "
          f"stack {result['stack_frame']} B  shared {result['shared_bytes']} B  buffers {result['buffers']}")
    others = f" (tile loops: {', '.join(map(str, loop['loops']))})" if len(loop["loops"]) > 1 else ""
    print(f"tile loop: {loop['instructions']} instructions per warp and tile{others}: "
          + ", ".join(f"{op} {n}" for op, n in list(loop["mix"].items())[:12]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
