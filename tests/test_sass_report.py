"""scripts/sass_report.py compiles kernel variants for sm_90 on a CPU-only machine: the claims the
launch configuration rests on (register cap, what the pipeliner buffers) are checked here without
a GPU. It runs in a subprocess: this process has the kernel loaded under the interpreter."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "sass_report.py"


def sass_report(*args: str) -> dict:
    out = subprocess.run([sys.executable, str(SCRIPT), "--json", *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_fp8_decode_runs_one_warp_tma_programs_with_tiles_in_flight_and_no_spill():
    # _fp8_decode_kernel: K and V by TMA, six stages. At eight it compiled to 137 registers, no spill,
    # 385 instructions per 16-key tile and three K and V boxes in flight, and ran 64 x 4096 on the
    # H200 in 157.8 us against the 4-warp kernel's 186.0 (results/h200/bench_compare_tma_decode.txt);
    # at six, 139 registers, 384 instructions and two boxes in flight ran it 2% faster again.
    for block_size in ("16", "64"):
        r = sass_report("--q", "fp8", "--kv", "fp8", "--block-size", block_size, "--decode")
        assert r["config"]["tma_decode"] and r["config"]["num_warps"] == 1 and r["config"]["num_stages"] == 6
        assert r["spill_stores"] == 0 and r["registers"] <= 168
        tiles = [b for b in r["buffers"] if b.endswith("x1x16x1x128xf8E4M3FN")]
        assert tiles and all(int(b.split("x")[0]) >= 2 for b in tiles)   # boxes of [1, 16, 1, 128], >= 2 in flight
        assert 100 < r["tile_loop"]["instructions"] <= 400 and r["tile_loop"]["mix"].get("HMMA", 0) > 0


def test_fp8_decode_keeps_its_register_cap_and_a_measurable_tile_loop():
    # The 4-warp kernel's decode, which caches TMA cannot read take.
    r = sass_report("--q", "fp8", "--kv", "fp8", "--block-size", "16", "--decode-no-tma")
    assert r["config"]["max_registers"] == 128
    assert r["registers"] <= 128
    assert r["tile_loop"]["instructions"] > 100 and r["tile_loop"]["mix"].get("HMMA", 0) > 0
    assert r["config"]["opaque_block_table"]
    # Whole tiles in an unmasked loop of their own, block numbers out of the pipeliner's sight: on the
    # H200 that compiled to 537 instructions (24 B spilled in all) and ran 64 x 4096 in 185.3 us,
    # against 212.1 us with the visible load (618 instructions, 44 B) and 214.5 us for one masked
    # loop (803, 24 B; results/h200/sweep_fp8_decode_block_table.json, sweep_unmasked_tiles.json).
    # An unmasked visible load once compiled that one loop to 40 B and 232.5 us
    # (results/h200/bench_before.json, bench_6559381.json): the pins are the measured code's.
    # Clamping the block-table reads to the sequence's blocks (no read past the table) made that
    # 555 instructions and 32 B, 185.9 us against 184.8 (results/h200/probe_table_overread.json).
    assert r["tile_loop"]["instructions"] <= 560 and r["tile_loop"]["mix"].get("LDL", 0) <= 3
    assert r["spill_stores"] <= 32


def test_an_opaque_block_table_load_lets_three_stages_double_buffer_k_and_v():
    # Visible, the block-table load takes a pipeline stage of its own and K/V stay single-buffered;
    # opaque, the same num_stages=3 keeps two K and two V tiles in flight.
    plain = sass_report("--decode-no-tma", "--config", '{"num_stages": 3, "opaque_block_table": false}')
    opaque = sass_report("--decode-no-tma", "--config", '{"num_stages": 3, "opaque_block_table": true}')
    # Each tile loop (whole tiles, then the masked rest) has its own buffers of the same shapes.
    fp8_tiles = lambda r: sorted({b for b in r["buffers"] if b.endswith("f8E4M3FN")})  # noqa: E731
    assert fp8_tiles(plain) == ["1x128x64xf8E4M3FN", "1x64x128xf8E4M3FN"]
    assert any(b.endswith("xi32") for b in plain["buffers"])  # the staged block numbers
    assert fp8_tiles(opaque) == ["2x128x64xf8E4M3FN", "2x64x128xf8E4M3FN"]
    assert not any(b.endswith("xi32") for b in opaque["buffers"])


def sass_diff(base: Path, *args: str):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "sass_diff.py"), str(base), "--json", *args],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode in (0, 1), out.stderr[-2000:]
    return out.returncode, {r["variant"]: r for r in json.loads(out.stdout)}


def _kernel_copy(folder: Path, edit=lambda source: source) -> Path:
    source = (ROOT / "kernel" / "unified_attention.py").read_text()
    (folder / "kernel").mkdir(parents=True)
    (folder / "kernel" / "unified_attention.py").write_text(edit(source))
    return folder


def test_sass_diff_finds_no_change_in_a_change_that_only_touches_comments(tmp_path):
    base = _kernel_copy(tmp_path, lambda s: s.replace("# -- online softmax --", "# -- the online softmax --"))
    code, rows = sass_diff(base, "--kinds", "decode", "--block-sizes", "16")
    assert code == 0 and len(rows) == 3 and all(r["same"] for r in rows.values())


def test_sass_diff_finds_the_variant_an_unmasked_block_table_load_changes(tmp_path):
    """The 6559381 form of the visible load, which measured 6-11% slower on the H200 in the FP8 decode
    (then 40 bytes of spill against 24). The 4-warp kernel's whole-sequence FP8 decode now loads the block
    numbers out of sight; its split-KV one still loads them visibly, and there the form spills 24 B against none."""
    masked = "    return tl.load(row_start + kv_pos // BLOCK_SIZE, mask=kv_valid, other=0)\n"
    unmasked = "    return tl.load(row_start + tl.where(kv_valid, kv_pos, 0) // BLOCK_SIZE)\n"
    base = _kernel_copy(tmp_path, lambda s: s.replace(masked, unmasked) if s.count(masked) == 1 else "stale test")
    code, rows = sass_diff(base, "--kinds", "split_no_tma", "--block-sizes", "16")
    fp8 = rows["split_no_tma q=fp8 kv=fp8 bs=16"]
    assert code == 1 and not fp8["same"]
    assert (fp8["base"]["spill_stores"], fp8["new"]["spill_stores"]) == (24, 0)


def test_fp8_decode_with_blocks_of_64_double_buffers_k_and_v_in_aligned_tiles():
    # One block per tile: keys find their block from their place in the tile, and the loop that
    # double-buffers K and V (3 stages) fits 128 registers with 24 B spilled (on the H200 64 x 4096
    # ran 197.0 us against 204.4 at 2 stages; results/h200/probe_aligned.json).
    r = sass_report("--q", "fp8", "--kv", "fp8", "--block-size", "64", "--decode-no-tma")
    assert r["config"]["aligned_tiles"] and r["config"]["num_stages"] == 3 and r["config"]["v_as_words"]
    assert r["registers"] <= 128
    assert r["buffers"] and all(b.startswith("2x") for b in r["buffers"])
    dividing = sass_report("--q", "fp8", "--kv", "fp8", "--block-size", "64", "--decode-no-tma",
                           "--config", '{"aligned_tiles": false}')
    assert r["tile_loop"]["instructions"] < dividing["tile_loop"]["instructions"]  # 483 against 573


def test_the_tile_loop_of_fp8_mmas_alone_is_found():
    # With P rounded to FP8, both products of the prefill loop are FP8 warpgroup MMAs (QGMMA) and no
    # 16-bit one is left; that loop must still be the one measured (results/h200/RESULTS.md, "P in
    # FP8, measured": 551 instructions per warp and tile against the default's 498).
    sass = ("        /*0000*/                   MOV R1, c[0x0][0x28] ;\n"
            ".L_x_7:\n"
            "        /*0010*/                   QGMMA.64x64x32.F32.E4M3.E4M3 R24, gdesc[UR4], R24 ;\n"
            "        /*0020*/                   FADD R2, R2, R3 ;\n"
            "        /*0030*/               @P0 BRA `(.L_x_7) ;\n"
            "        /*0040*/                   EXIT ;\n")
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import sass_report; "
            "print(json.dumps(sass_report.tile_loop_mix(sys.stdin.read())))")
    out = subprocess.run([sys.executable, "-c", code, str(SCRIPT.parent)], input=sass, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    mix = json.loads(out.stdout)
    assert mix["instructions"] == 3 and mix["mix"] == {"QGMMA": 1, "FADD": 1, "BRA": 1} and mix["loops"] == [3]
