"""bench.run: the byte and FLOP counts on hand-computed shapes, the bars' logic, and a whole
`--quick` run (under the interpreter without a GPU) that must pass its checks and write both files."""
from __future__ import annotations

import json

import pytest

from bench import run as bench


def test_counts_for_a_small_mixed_batch():
    # One decode of 10 keys and a 3-token chunk after 2 keys of context; 4 q / 2 kv heads, head 8.
    seqs = [(1, 10), (3, 5)]
    assert bench.attended_keys(1, 10) == 10               # a decode sees every key
    assert bench.attended_keys(3, 5) == 3 + 4 + 5         # rows see context + 1, + 2, + 3 keys
    assert bench.attended_keys(3, 5, causal=False) == 15
    assert bench.attention_flops(seqs, 4, 8) == 4 * 4 * 8 * (10 + 12)
    assert bench.kv_cache_bytes(seqs, 2, 8, 1) == (10 + 5) * 2 * 8 * 1 * 2
    # + 4 query tokens x 4 heads x 8 x (1 byte of FP8 q + 2 bytes of bf16 out)
    assert bench.attention_bytes(seqs, 4, 2, 8, 1, 1, 2) == 480 + 4 * 4 * 8 * 3


def test_counts_for_the_benchmark_shapes():
    dec = bench.decode(64, 4096, 16)
    assert bench.attention_bytes(dec.seqs, 32, 8, 128, 1, 1, 2) == 64 * 4096 * 8 * 128 * 2 + 64 * 32 * 128 * 3
    assert bench.attention_flops(dec.seqs, 32, 128) == 4 * 32 * 128 * 64 * 4096
    pre = bench.prefill(4, 4096, 64)
    assert bench.attention_flops(pre.seqs, 32, 128) == 4 * 32 * 128 * 4 * (4096 * 4097 // 2)
    mix = bench.mixed(2048, 2048, 64, 4096, 16)
    assert mix.label == "1x2048@2048+64x4096"
    assert bench.attention_flops(mix.seqs, 32, 128) == \
        4 * 32 * 128 * (2048 * 2048 + 2048 * 2049 // 2 + 64 * 4096)


def test_reference_check_takes_a_prefix_only_when_too_big():
    assert bench.sequences_to_check(bench.decode(8, 4096, 16)) == 8
    assert bench.sequences_to_check(bench.prefill(1, 8192, 64)) == 1        # the reference chunks it
    assert bench.sequences_to_check(bench.prefill(4, 4096, 64)) == 2        # never fewer than two
    big = bench.decode(64, 8192, 16)
    n = bench.sequences_to_check(big)
    assert 1 <= n < 64 and bench.reference_bytes(big.seqs[:n]) <= bench.REF_CHECK_BYTES
    assert bench.sequences_to_check(bench.mixed(2048, 2048, 64, 4096, 16)) == 65


def _row(kind, shape, q, kv, *, us, frac=None, tflops=None, num_seqs=64, kv_len=4096, bs=16):
    return dict(id=f"{kind} {shape} bs{bs} q={q} kv={kv}", kind=kind, shape=shape, block_size=bs, q_dtype=q,
                kv_dtype=kv, num_seqs=num_seqs, kv_len=kv_len, status="ok", median_us=us,
                bandwidth_fraction=frac, achieved_tflops=tflops)


def test_bars():
    rows = [_row("decode", "64x4096", "fp8", "fp8", us=200, frac=0.85),
            _row("decode", "64x4096", "bf16", "fp8", us=210, frac=0.81),
            _row("decode", "64x4096", "bf16", "bf16", us=380, frac=0.93),
            _row("prefill", "4x4096", "fp8", "fp8", us=100, tflops=500, num_seqs=4),
            _row("prefill", "4x4096", "bf16", "bf16", us=120, tflops=300, num_seqs=4)]
    bars = bench.evaluate_bars(rows)
    assert bars["decode_fp8_cache_bandwidth"]["met"] and bars["decode_fp8_cache_bandwidth"]["measured"] == 0.81
    assert bars["decode_fp8_cache_faster_than_bf16"]["met"]
    assert bars["decode_fp8_cache_faster_than_bf16"]["measured"] == pytest.approx(210 / 380)
    assert bars["decode_bf16_cache_bandwidth"]["met"]
    assert bars["prefill_bf16_4x4k_tflops"]["met"]
    assert not bars["prefill_fp8_speedup"]["met"] and bars["prefill_fp8_speedup"]["measured"] == pytest.approx(1.2)
    assert bars["decode_single_32k_bandwidth"]["measured"] is None and not bars["decode_single_32k_bandwidth"]["met"]
    rows[1]["status"] = "check_failed"
    assert not bench.evaluate_bars(rows)["decode_fp8_cache_bandwidth"]["met"]
    assert all(not b["met"] for b in bench.evaluate_bars(rows, timings_are_speed=False).values())


def test_quick_run_writes_json_and_plot(tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    assert bench.main(["--quick", "--out", str(out), "--plot", str(png)]) == 0
    result = json.loads(out.read_text())
    assert {"device", "torch", "triton", "ceilings", "rows", "bars", "compile", "kernel_sha256"} <= set(result)
    assert result["kernel"] == "kernel:unified_attention"
    rows = result["rows"]
    assert {r["kind"] for r in rows} == {"decode", "prefill", "mixed"}
    for kind in ("decode", "prefill", "mixed"):
        configs = {(r["q_dtype"], r["kv_dtype"]) for r in rows if r["kind"] == kind}
        assert configs == set(bench.DTYPE_CONFIGS)
    for r in rows:
        assert r["status"] == "ok", r
        assert r["check"]["passed"] and r["check"]["tol_ratio"] <= 1 and r["check"]["n_beyond_tol"] == 0
        assert r["median_us"] > 0
        seqs = [(q, kv) for q, kv, n in r["seq_groups"] for _ in range(n)]
        assert r["flops"] == bench.attention_flops(seqs, 32, 128)
        assert r["bytes"] == bench.attention_bytes(seqs, 32, 8, 128, 1 if r["q_dtype"] == "fp8" else 2,
                                                   1 if r["kv_dtype"] == "fp8" else 2, 2)
    assert set(result["bars"]) >= {"decode_fp8_cache_bandwidth", "prefill_fp8_speedup"}
    assert all(set(b) >= {"target", "measured", "met"} for b in result["bars"].values())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_filter_matching_nothing_is_an_error(tmp_path):
    assert bench.main(["--quick", "--filter", "no such row", "--out", str(tmp_path / "b.json")]) == 2


def test_another_kernel_is_checked_before_it_is_timed(tmp_path):
    # A kernel that ignores the FP8 value descale (V was quantized with scale 0.25: the prefill's
    # output comes out 4x too large) fails the row's check, so the row is not timed and the run exits
    # 1. The run names that kernel and hashes its own source, not ours.
    out = tmp_path / "variant.json"
    spec = "harness.mutants:v_scale_ignored"
    args = ["--quick", "--filter", "prefill 2x64 bs16 q=fp8", "--out", str(out), "--plot", ""]
    assert bench.main([*args, "--kernel", spec]) == 1
    result = json.loads(out.read_text())
    assert result["kernel"] == spec and result["complete"]
    assert result["kernel_sha256"] != bench.kernel_identity()["kernel_sha256"]
    (r,) = result["rows"]
    assert r["status"] == "check_failed" and r["median_us"] is None
    assert r["check"]["tol_ratio"] > 10 and r["check"]["n_beyond_tol"] > 0
    assert bench.main(args) == 0  # the same row, our kernel


def test_the_check_refuses_a_kernel_that_rounds_p_to_fp8(tmp_path):
    # The bound is verify's (cases/tolerances.yaml), which a kernel rounding P to FP8 breaks by design.
    # The bound bench used before (0.05 on the max error) let such a kernel through on some H200 rows.
    out = tmp_path / "p8.json"
    assert bench.main(["--quick", "--filter", "prefill 2x64 bs16 q=fp8", "--out", str(out), "--plot", "",
                       "--kernel", "harness.mutants:p_rounded_to_fp8"]) == 1
    (r,) = json.loads(out.read_text())["rows"]
    assert r["status"] == "check_failed" and r["check"]["tol_ratio"] > 1
    assert r["check"]["tolerance"] == {"atol": 2.0e-3, "rtol": 7.8125e-3, "mean_atol": 1.5e-3}  # fp8/fp8/bf16


def test_a_kernel_that_cannot_be_loaded_is_a_one_line_error(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert bench.main(["--quick", "--kernel", "no_such_module:unified_attention", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no_such_module:unified_attention" in err
    assert not out.exists()
