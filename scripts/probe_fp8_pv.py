"""Probe (GPU): how fast is the FP8 prefill when P.V runs on the FP8 tensor cores with V keys-contiguous?

    python scripts/probe_fp8_pv.py [--out results/h200/probe_fp8_pv.json] [--quick]

The FP8 MMA takes both operands K-major: for P.V, V with its keys contiguous. The paged cache
holds the head dim contiguous, so with P in FP8 (the self-check's p_rounded_to_fp8) Triton
transposes V in registers every tile and the prefill ran 1.5-1.8x slower than the 16-bit P.V
(results/h200/RESULTS.md, "FP8 prefill"). This probe gives the kernel what that MMA wants: a
gathered, transposed copy of the batch's V, [num_seqs, num_kv_heads, head_size, keys], built by
torch in each call (its time is counted) and read by a copy of the kernel with P rounded to FP8.
It times, per benchmark prefill shape, in one run: the bf16 prefill, the FP8 prefill (ours, P
16-bit), the probe with and without building the copy, promoting the FP8 P.V products or not,
and a few tilings; and each variant's error against the float32 reference.

A probe, not a kernel path: P in FP8 costs the accuracy that cases/tolerances.yaml promises
(its check fails by design), and the copy is built with torch ops over the whole block table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench import run as bench  # noqa: E402
from harness.kernels import import_file  # noqa: E402
from kernel import unified_attention  # noqa: E402

KERNEL_SOURCE = Path(__file__).resolve().parent.parent / "kernel" / "unified_attention.py"

# Source edits that make the probe kernels; each snippet must occur exactly once.
V_LOAD = "        v = tl.load(v_ptr + v_row + offs_d[None, :], mask=kv_valid[:, None] & d_valid[None, :], other=0.0)\n"
V_LOAD_T = ("        v = tl.load(v_ptr + seq_idx.to(tl.int64) * stride_v_blk + kv_head_off * stride_v_head\n"
            "                    + kv_pos[:, None] + offs_d[None, :].to(tl.int64) * stride_v_tok,\n"
            "                    mask=kv_valid[:, None] & d_valid[None, :], other=0.0)\n")
PV_DOT = "    acc += _dot(_cast(p, PV_DTYPE, INTERPRET_SAFE), v.to(PV_DTYPE), INTERPRET_SAFE)\n"
V_T_EDITS = (  # V read from the transposed copy the launcher is given (TAIL)
    (V_LOAD, V_LOAD_T),
    ("            q, k, v,                                                         #\n",
     "            q, k, _v_arg(v),                                                 #\n"),
    ("            v.stride(0), v.stride(1), v.stride(2),                           #\n",
     "            *_v_strides(v),                                                  #\n"),
)
P_FP8_EDIT = ("PV_DTYPE=tl.float16 if kv_fp8 else", "PV_DTYPE=tl.float8e4nv if kv_fp8 else")
PROMOTE_EDIT = (PV_DOT, "    acc += tl.dot(p.to(PV_DTYPE), v, max_num_imprecise_acc=FP8_PROMOTE_K)\n")
# An upper bound: Q.K^T's FP8 products promoted to float32 once per head dim instead of every 32
# (132 fewer FADD per warp and tile; 45 FP8-q cases of default.yaml failed that way, RESULTS.md).
QK_ONCE_EDIT = ("FP8_PROMOTE_K=min(32, head_pad),", "FP8_PROMOTE_K=head_pad,")
TAIL = '''

# -- probe: V from a transposed copy [num_seqs, num_kv_heads, head_size, keys] when one is set --
_VT = None


def _v_arg(v):
    return v if _VT is None else _VT


def _v_strides(v):  # (per sequence, per head-dim element, per kv head): what the edited load reads
    return (v.stride(0), v.stride(1), v.stride(2)) if _VT is None else (_VT.stride(0), _VT.stride(2), _VT.stride(1))
'''


def probe_module(name: str, workdir: Path, extra_edits=(P_FP8_EDIT,)):
    """The kernel reading V from a transposed copy, with extra_edits (by default P rounded to FP8)."""
    source = KERNEL_SOURCE.read_text()
    for old, new in V_T_EDITS + tuple(extra_edits):
        if source.count(old) != 1:
            raise ValueError(f"probe_fp8_pv: snippet occurs {source.count(old)} times in the kernel: {old.strip()[:60]}")
        source = source.replace(old, new)
    path = workdir / f"{name}.py"
    path.write_text(source + TAIL)
    return import_file(path, name)


def transposed_v(v: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """[num_seqs, num_kv_heads, head_size, max_blocks * block_size]: each sequence's V, keys contiguous."""
    pages = v[block_table.long()]                                   # [S, B, bs, H, D]
    s, b, bs, h, d = pages.shape
    # reshape alone would merge B and bs as a view (keys stay strided): the copy is the transpose
    return pages.permute(0, 3, 4, 1, 2).contiguous().view(s, h, d, b * bs)


def attention_with(module, prebuilt=None):
    """unified_attention of the probe module over a transposed V (built per call unless given)."""
    def attention(**call):
        module._VT = prebuilt if prebuilt is not None else transposed_v(call["v"], call["block_table"])
        try:
            return module.unified_attention(**call)
        finally:
            module._VT = None
    attention.__module__ = module.__name__
    return attention


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/probe_fp8_pv.json"))
    parser.add_argument("--quick", action="store_true", help="one small shape (a smoke test of the probe itself)")
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    shapes = [bench.prefill(2, 256, 64)] if args.quick else \
        [bench.prefill(2, 1024, 64), bench.prefill(4, 4096, 64), bench.prefill(1, 8192, 64), bench.prefill(4, 4096, 16)]
    workdir = Path(tempfile.mkdtemp(prefix="probe_fp8_pv_"))
    plain = probe_module("probe_fp8_pv_plain", workdir)
    promoted = probe_module("probe_fp8_pv_promoted", workdir, [P_FP8_EDIT, PROMOTE_EDIT])
    qk_once = probe_module("probe_fp8_pv_qk_once", workdir, [P_FP8_EDIT, QK_ONCE_EDIT])
    rows = []
    for shape in shapes:
        seed = 1234
        result = {"shape": shape.label, "block_size": shape.block_size, "variants": {}}
        for q_dtype, kv_dtype in (("bf16", "bf16"), ("fp8", "fp8")):
            calls = bench.build_calls(shape, q_dtype, kv_dtype, bench.rotating_copies(shape, q_dtype, kv_dtype, False),
                                      device, seed)
            check = bench.check_row(shape, q_dtype, kv_dtype, calls, device, seed)
            us = bench.graph_time_us([lambda c=c: unified_attention(**c) for c in calls])
            result["variants"][f"{q_dtype} (ours)"] = {"us": us, "check": check}
            if q_dtype == "bf16":
                continue
            default = plain.default_launch_config(calls[0]["q"], calls[0]["k"], calls[0]["v"], calls[0]["seqused_k"],
                                                  calls[0]["max_seqlen_q"], calls[0]["max_seqlen_k"])
            tilings = {"default": default,
                       "tile128": dataclasses.replace(default, tile=128, aligned_tiles=False),
                       "stages3": dataclasses.replace(default, num_stages=3),
                       "warps4": dataclasses.replace(default, num_warps=4)}
            for module, label in ((plain, "P fp8"), (promoted, "P fp8, P.V promoted every 32"),
                                  (qk_once, "P fp8, Q.K^T promoted once")):
                for tiling, config in tilings.items():
                    if module is not plain and tiling != "default":
                        continue
                    name = f"{label}, {tiling}"
                    attention = attention_with(module)
                    entry = {"config": dataclasses.asdict(config)}
                    try:
                        run = lambda c, a=attention, cfg=config: a(**c, config=cfg)  # noqa: E731
                        entry["check"] = bench.check_row(shape, "fp8", "fp8", calls, device, seed,
                                                         lambda **c: run(c))
                        entry["us"] = bench.graph_time_us([lambda c=c: run(c) for c in calls])
                        if tiling == "default":
                            prebuilt = [transposed_v(c["v"], c["block_table"]) for c in calls]
                            entry["us_copy_prebuilt"] = bench.graph_time_us(
                                [lambda c=c, w=w: attention_with(module, w)(**c, config=config)
                                 for c, w in zip(calls, prebuilt)])
                            entry["us_copy_alone"] = bench.graph_time_us(
                                [lambda c=c: transposed_v(c["v"], c["block_table"]) for c in calls])
                            module._VT = prebuilt[0]
                            entry["compiled"] = bench.compiled_kernel_facts(dict(calls[0], config=config),
                                                                            module.unified_attention)
                            module._VT = None
                            del prebuilt
                    except Exception as exc:  # noqa: BLE001  (one variant failing must not end the probe)
                        entry["error"] = f"{type(exc).__name__}: {exc}"[:400]
                    result["variants"][name] = entry
            del calls
            bench._free(device)
        bf16_us = result["variants"]["bf16 (ours)"]["us"]
        for entry in result["variants"].values():
            if entry.get("us"):
                entry["speedup_over_bf16"] = bf16_us / entry["us"]
        rows.append(result)
        print(f"== prefill {shape.label} bs{shape.block_size}", flush=True)
        for name, entry in result["variants"].items():
            check = entry.get("check") or {}
            print(f"  {name:34s} {entry.get('us', float('nan')):9.1f} us  x{entry.get('speedup_over_bf16', 0):.3f}"
                  f"  prebuilt {entry.get('us_copy_prebuilt', float('nan')):8.1f}  copy {entry.get('us_copy_alone', float('nan')):6.1f}"
                  f"  max_err {check.get('max_abs_err')}  mean_err {check.get('mean_abs_err')}  {entry.get('error', '')}",
                  flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": __import__("triton").__version__}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
