"""scripts/ncu_source_stalls.py reads Nsight Compute's source page (no GPU needed)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import ncu_source_stalls as S  # noqa: E402

PAGE = '''"Kernel Name","_unified_attention_kernel",
"Address","Source","Warp Stall Sampling (All Samples)","# Samples","stall_long_sb","stall_barrier","stall_short_sb","stall_long_sb (Not Issued)"
"0x7f0000000100","      DEPBAR.LE SB0, 0x0","0","0","0","0","0","0"
"0x7f0000000110","      BAR.SYNC.DEFER_BLOCKING 0x0","60","60","59","1","0","59"
"0x7f0000000120","      @!P0 LDS.64 R10, [R52+UR9+0x4800]","30","30","0","0","30","0"
"0x7f0000000130","      FADD R1, R2, R3","10","10","0","0","10","0"
'''


def test_reasons_opcodes_and_hottest_instructions(tmp_path):
    path = tmp_path / "source.csv"
    path.write_text(PAGE)
    rows = S.read_source_page(path)
    assert len(rows) == 4
    text = S.summarize(rows, top=2)
    assert "100 warp samples" in text
    assert "long_sb 0.590" in text and "short_sb 0.400" in text and "barrier 0.010" in text
    assert "(Not Issued)" not in text
    assert "BAR.SYNC.DEFER_BLOCKING 0.600" in text and "LDS.64 0.300" in text  # predicate dropped
    hottest = text.splitlines()[4]
    assert hottest.split()[:2] == ["10", "0.600"]                       # offset from the first instruction
    assert "long_sb 0.98" in hottest and hottest.endswith("| DEPBAR.LE SB0, 0x0")
    assert len(text.splitlines()) == 6                                  # --top 2


def test_a_page_without_samples_says_so(tmp_path):
    path = tmp_path / "source.csv"
    path.write_text(PAGE.replace('"60"', '"0"').replace('"30"', '"0"').replace('"10"', '"0"'))
    assert "no warp samples" in S.summarize(S.read_source_page(path), top=5)
