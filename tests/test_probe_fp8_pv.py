"""scripts/probe_fp8_pv.py: its edits still apply to the kernel, its transposed V copy holds the
cache's values keys-contiguous, and the kernel reading that copy computes what ours computes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import probe_fp8_pv as probe  # noqa: E402
from bench import run as bench  # noqa: E402
from kernel import unified_attention  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _call(shape, seed=3):
    return bench.build_calls(shape, "fp8", "fp8", 1, DEVICE, seed)[0]


def test_transposed_v_is_each_sequence_keys_contiguous():
    call = _call(bench.prefill(2, 40, 16))
    v, table = call["v"], call["block_table"]
    vt = probe.transposed_v(v, table)
    num_seqs, num_kv_heads, head_size, keys = vt.shape
    assert (num_seqs, num_kv_heads, head_size, keys) == (2, bench.NUM_KV_HEADS, bench.HEAD_SIZE, table.shape[1] * 16)
    assert vt.stride(3) == 1 and vt.is_contiguous()  # a view would leave the keys strided
    pos = torch.arange(keys)
    for s in range(num_seqs):
        want = v[table[s, pos // 16].long(), pos % 16]          # [keys, heads, head_size]
        assert torch.equal(vt[s].permute(2, 0, 1).float(), want.float())


def test_kernel_reading_the_copy_computes_what_ours_computes(tmp_path):
    # P kept in float16: only where V is read from differs. The interpreter then computes the same
    # bits; on a GPU the MMA may take V from shared memory in another order, within the bf16
    # output's rounding.
    module = probe.probe_module("probe_fp8_pv_v_only", tmp_path, extra_edits=())
    call = _call(bench.prefill(2, 96, 16))
    ours = unified_attention(**dict(call, out=torch.empty_like(call["out"])))
    probed = probe.attention_with(module)(**dict(call, out=torch.empty_like(call["out"])))
    if DEVICE.type == "cpu":
        assert torch.equal(ours, probed)
    else:
        torch.testing.assert_close(probed, ours, atol=0.0, rtol=2 ** -7)
    assert module._VT is None  # the copy is dropped after the call


def test_probe_compiles_p_v_as_an_fp8_mma_with_v_pipelined_keys_contiguous():
    # What the probe rests on, for sm_90 without a GPU: V's 64-key tiles reach shared memory through
    # the pipeliner's buffers (two in flight, keys contiguous), and P.V is an FP8 warpgroup MMA.
    code = (
        "import json, sys, tempfile; from pathlib import Path; sys.path[:0] = ['scripts', '.']\n"
        "import sass_report\n"
        "import probe_fp8_pv as probe\n"
        "m = probe.probe_module('probe_sass', Path(tempfile.mkdtemp()))\n"
        "print(json.dumps(sass_report.report('fp8', 'fp8', 128, 64, 'prefill', {}, module=m)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    assert "2x64x128xf8E4M3FN" in r["buffers"]
    mix = r["tile_loop"]["mix"]
    assert mix.get("QGMMA", 0) > 0 and mix.get("HGMMA", 0) == 0  # both MMAs FP8, none 16-bit
