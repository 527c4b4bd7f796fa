"""Our kernel against the quantization-aware reference, under the interpreter (or a GPU if present).

Each case asserts two things: the error stays inside the per-dtype tolerance of
cases/tolerances.yaml (its error analysis is written there), and the same call with the q and k
scales dropped (passed as 1.0, the original bug) exceeds that tolerance at least 10x.
"""
from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import pytest
import torch

import harness  # noqa: F401  (selects the interpreter when there is no GPU)
from harness.inputs import build_inputs
from harness.matrix import case_id, default_num_blocks, load_suite, load_tolerances
from harness.metrics import error_metrics
from harness.schema import Case
from kernel import LaunchConfig, launch_config, unified_attention
UA = importlib.import_module("kernel.unified_attention")  # the module (the package exports the function)
from reference import paged_attention_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCES = load_tolerances(Path(__file__).parent.parent / "cases" / "tolerances.yaml")
MIXED = ((1, 40), (5, 18), (17, 70))
PAIRS = [("fp8", "fp8"), ("bf16", "fp8"), ("fp16", "fp8"), ("bf16", "bf16"), ("fp16", "fp16")]


def make_case(**over) -> Case:
    base = dict(q_dtype="fp8", kv_dtype="fp8", out_dtype="bf16", scales=(0.75, 0.5, 0.25), heads=(8, 2),
                head_size=64, block_size=16, num_blocks=0, seqs="mixed", seq_lens=MIXED)
    base.update(over)
    case = Case(**base)
    case = dataclasses.replace(case, num_blocks=case.num_blocks or default_num_blocks(case.seq_lens, case.block_size))
    return dataclasses.replace(case, id=case_id(case))


def run_kernel(inputs, path: str, **changes) -> torch.Tensor:
    kwargs = dict(inputs.kernel_kwargs, **changes)
    out = inputs.fresh_out()
    unified_attention(**kwargs, split_kv=path == "3d", validate=True)
    return out.clone()


def check(case: Case, path: str, **changes) -> None:
    inputs = build_inputs(case, DEVICE)
    tol = TOLERANCES.for_case(case)
    ref = paged_attention_ref(**inputs.ref_kwargs)
    m = error_metrics(run_kernel(inputs, path, **changes), ref, tol["atol"], tol["rtol"])
    assert m["n_nan"] == 0 and m["n_inf"] == 0, m
    assert m["tol_ratio"] <= 1.0, f"{case.id}: {m}"
    assert m["mean_abs_err"] <= tol["mean_atol"], f"{case.id}: {m}"
    if case.q_dtype != "fp8" and case.kv_dtype != "fp8":
        return  # no scale to drop
    one = torch.ones(1, dtype=torch.float32, device=DEVICE)
    dropped = {"q_descale": one if case.q_dtype == "fp8" else None, "k_descale": one}
    m_bad = error_metrics(run_kernel(inputs, path, **changes, **dropped), ref, tol["atol"], tol["rtol"])
    assert m_bad["tol_ratio"] >= 10.0, f"{case.id}: dropped scales only reach {m_bad['tol_ratio']:.2f}x"


@pytest.mark.parametrize("path", ["2d", "3d"])
@pytest.mark.parametrize("q_dtype,kv_dtype", PAIRS)
def test_dtype_pairs(q_dtype, kv_dtype, path):
    check(make_case(q_dtype=q_dtype, kv_dtype=kv_dtype), path)


@pytest.mark.parametrize("path", ["2d", "3d"])
@pytest.mark.parametrize("feature", [
    dict(block_size=48, head_size=80),
    dict(window=8),
    dict(softcap=10.0),
    dict(out_dtype="fp16"),
    dict(scale_layout="per_seq_head"),
    dict(heads=(32, 1)),
    dict(heads=(4, 4), causal=False),
    dict(layout="strided", q_dtype="bf16"),
], ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_features(feature, path):
    check(make_case(**feature), path)


@pytest.mark.parametrize("q_dtype,block_size", [("fp8", 16), ("bf16", 16), ("bf16", 64)])
def test_prefill_heavy_batch_with_fp8_cache_on_128_row_tiles(q_dtype, block_size):
    # Queries averaging >= 128 tokens take the 128-row tiling (launch_config); check it end to end.
    # A bf16 q with blocks of 64 computes Q.K^T there in float16 (q_as_f16).
    case = make_case(q_dtype=q_dtype, block_size=block_size, seq_lens=((130, 130), (140, 200)), seqs="prefill")
    check(case, "2d")


def test_split_kv_with_many_segments_holding_keys():
    # 16 segments of 64-key tiles: 1100 keys put data in every segment.
    config = LaunchConfig(block_m=16, tile=64, num_segments=16, num_warps=4, num_stages=3)
    check(make_case(seq_lens=((1, 1100), (1, 700)), seqs="long_decode"), "3d", config=config)


@pytest.mark.parametrize("feature", [
    dict(),                                              # causal: tiles below the diagonal
    dict(window=40),                                     # both window edges masked, the middle not
    dict(window=8, q_dtype="bf16", kv_dtype="bf16"),
    dict(heads=(4, 4), causal=False, softcap=10.0),
    dict(seq_lens=((1, 300), (1, 97)), seqs="long_decode"),
], ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()) or "causal")
@pytest.mark.parametrize("path", ["2d", "3d"])
def test_whole_tiles_without_masks_match_one_masked_loop(feature, path):
    # 16-key tiles put several whole tiles in short sequences. A whole tile's masks select every
    # score, so leaving them out changes no value: under the interpreter not one bit; compiled,
    # fused multiply-adds may round differently, and the reference check bounds both.
    case = make_case(**feature)
    inputs = build_inputs(case, DEVICE)
    segments = 4 if path == "3d" else 1
    config = LaunchConfig(block_m=16, tile=16, num_segments=segments, num_warps=4, num_stages=2, unmasked_tiles=True)
    check(case, path, config=config)
    one_loop = run_kernel(inputs, path, config=dataclasses.replace(config, unmasked_tiles=False))
    if DEVICE == "cpu":
        assert torch.equal(run_kernel(inputs, path, config=config), one_loop)


@pytest.mark.parametrize("feature", [
    dict(),                                              # causal prefill and decode rows
    dict(window=40),
    dict(heads=(4, 4), causal=False, softcap=10.0, q_dtype="bf16", kv_dtype="bf16"),
    dict(seq_lens=((1, 300), (1, 97)), seqs="long_decode"),
], ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()) or "causal")
@pytest.mark.parametrize("tile", [16, 32])
@pytest.mark.parametrize("path", ["2d", "3d"])
def test_block_aligned_tiles_find_the_keys_that_dividing_positions_finds(feature, tile, path):
    # Tiles of one block (16) and of two (32): each key's block and slot come from its place in the
    # tile instead of its position; the same keys, so the same values to the bit under the interpreter.
    case = make_case(**feature)
    inputs = build_inputs(case, DEVICE)
    segments = 4 if path == "3d" else 1
    config = LaunchConfig(block_m=16, tile=tile, num_segments=segments, num_warps=4, num_stages=2, aligned_tiles=True)
    check(case, path, config=config)
    dividing = run_kernel(inputs, path, config=dataclasses.replace(config, aligned_tiles=False))
    if DEVICE == "cpu":
        assert torch.equal(run_kernel(inputs, path, config=config), dividing)


def test_aligned_tiles_is_ignored_where_tiles_cross_blocks():
    # Blocks of 48 under 16-key tiles: tiles do not start on block boundaries, so the flag is ignored.
    case = make_case(block_size=48, head_size=80)
    config = LaunchConfig(block_m=16, tile=16, num_segments=1, num_warps=4, num_stages=2, aligned_tiles=True)
    check(case, "2d", config=config)


@pytest.mark.parametrize("shift", [17, -30])
def test_bf16_q_in_float16_keeps_queries_outside_float16_range(shift):
    # q * 2^shift with softmax_scale * 2^-shift is the same attention, and every product stays
    # exact, so the output must not change by one bit. A plain float16 q would overflow at 2^17
    # and flush to zero at 2^-30; the kernel's power-of-two rescale must absorb both.
    case = make_case(q_dtype="bf16")
    inputs = build_inputs(case, DEVICE)
    config = LaunchConfig(block_m=64, tile=64, num_segments=1, num_warps=4, num_stages=3, q_as_f16=True)
    check(case, "2d", config=config)
    q, scale = inputs.kernel_kwargs["q"], inputs.kernel_kwargs["softmax_scale"]
    same = run_kernel(inputs, "2d", config=config)
    moved = run_kernel(inputs, "2d", config=config, q=q * 2.0 ** shift, softmax_scale=scale * 2.0 ** -shift)
    assert torch.equal(moved, same)


def _config(**over):
    """launch_config for a batch; by default for caches TMA cannot read (layout=strided), whose
    FP8 decode takes the 4-warp kernel: the rules most tests below pin. _tma_config: the rest."""
    base = dict(max_seqlen_q=1, max_seqlen_k=32768, num_seqs=1, num_kv_heads=8, queries_per_kv=4,
                head_size=128, block_size=16, q_fp8=True, kv_fp8=True, device=torch.device("cpu"),
                tma_readable=False)
    base.update(over)
    base.setdefault("num_tokens", base["num_seqs"] * base["max_seqlen_q"])
    return launch_config(**base)


def _tma_config(**over):
    return _config(**dict(over, tma_readable=True))


def test_launch_config_fp8_cache_decode_takes_the_one_warp_tma_kernel():
    tma = _tma_config(num_seqs=64, max_seqlen_k=4096)
    assert (tma.tma_decode, tma.num_warps, tma.tile, tma.num_stages, tma.block_m) == (True, 1, 16, 6, 8)
    assert _tma_config(q_fp8=False, block_size=48).tma_decode                   # blocks of 3 tiles
    assert _tma_config(queries_per_kv=16).block_m == 16
    for other in (dict(kv_fp8=False, q_fp8=False), dict(max_seqlen_q=7), dict(head_size=256),
                  dict(queries_per_kv=32), dict(block_size=8), dict(block_size=24)):
        assert not _tma_config(**other).tma_decode, other
    assert not _config().tma_decode                                             # TMA cannot read the cache


def test_tma_decode_splits_batches_into_about_1024_programs():
    segments = lambda **over: _tma_config(**over).num_segments  # noqa: E731
    assert segments(num_seqs=64, max_seqlen_k=4096) == 2       # 512 programs
    assert segments(num_seqs=256, max_seqlen_k=1024) == 1      # 2048 programs
    assert segments() == 128                                   # one 32k sequence: 8 programs
    assert segments(num_seqs=8, max_seqlen_k=4096) == 16
    assert segments(max_seqlen_k=1024) == 4                    # segments of at least 16 tiles
    assert segments(max_seqlen_k=100) == 1
    assert segments(max_seqlen_k=100, split_kv=True) == 2      # forced paths
    assert segments(num_seqs=64, max_seqlen_k=4096, split_kv=False) == 1


def test_launch_config_hides_the_block_table_load_only_where_it_measured_faster():
    # Prefill-heavy batches with a 16-bit q, at 2 stages, and whole-sequence FP8-cache decode;
    # never split-KV or bf16-cache decode, mixed batches or an FP8 q's prefill.
    prefill = dict(max_seqlen_q=4096, max_seqlen_k=4096, num_seqs=4, num_tokens=4 * 4096)
    bf16 = _config(**prefill, q_fp8=False, kv_fp8=False)
    assert bf16.opaque_block_table and bf16.num_stages == 2
    assert _config(**prefill, q_fp8=False, block_size=64).opaque_block_table  # bf16 q, FP8 cache
    assert not _config(**prefill, q_fp8=False).opaque_block_table       # ... but blocks of 16
    assert not _config(**prefill).opaque_block_table                    # FP8 q
    assert not _config(q_fp8=False, kv_fp8=False).opaque_block_table    # decode, bf16 cache
    batch = dict(num_seqs=64, max_seqlen_k=4096)                         # decode, FP8 cache:
    assert _config(**batch).opaque_block_table and _config(**batch, q_fp8=False, block_size=64).opaque_block_table
    assert not _config().opaque_block_table                              # ... but not split-KV
    mixed = dict(max_seqlen_q=2048, max_seqlen_k=4096, num_seqs=65, num_tokens=2048 + 64)
    assert not _config(**mixed, q_fp8=False, kv_fp8=False).opaque_block_table
    assert not _config(**prefill, head_size=256, q_fp8=False, kv_fp8=False).opaque_block_table


def test_launch_config_splits_long_decodes_that_cannot_fill_the_gpu():
    # The interpreter stands in 132 SMs; split-KV aims at the programs an SM holds: 2 at the
    # default tiling, 4 at the FP8 cache's 128-register decode tiling.
    bf16 = dict(kv_fp8=False, q_fp8=False)
    assert _config(**bf16).num_segments == 32                            # 8 programs -> 264 / 8 -> 32
    assert _config().num_segments == 64                                  # FP8: 528 / 8 -> 64
    assert _config(num_seqs=8, max_seqlen_k=4096, **bf16).num_segments == 4    # 64 programs -> 4
    assert _config(num_seqs=8, max_seqlen_k=4096).num_segments == 8
    assert _config(num_seqs=64, max_seqlen_k=4096).num_segments == 1     # 512 programs: enough
    assert _config(max_seqlen_k=512).num_segments == 1                   # short: not worth splitting
    assert _config(max_seqlen_q=7).num_segments == 1                     # prefill tiles fill the GPU
    # Forced split of a short sequence: at least two segments, none below the tile minimum.
    assert _config(max_seqlen_k=100, split_kv=True).num_segments == 2
    assert _config(max_seqlen_k=2100, split_kv=True, **bf16).num_segments == 4  # 17 tiles of 128 // 4
    assert _config(max_seqlen_k=2100, split_kv=True).num_segments == 8          # 33 tiles of 64 // 4


def test_launch_config_decode_streams_long_tiles():
    bf16 = dict(kv_fp8=False, q_fp8=False)
    assert (_config(**bf16).tile, _config(**bf16).num_stages) == (128, 2)
    assert _config(head_size=256).tile == 32       # 256-wide rows: register pressure
    assert _config(max_seqlen_q=64).tile == 64


def test_launch_config_fp8_decode_fits_four_programs_per_sm():
    whole = _config(num_seqs=64, max_seqlen_k=4096)
    assert (whole.tile, whole.max_registers, whole.v_as_words, whole.num_stages) == (64, 128, False, 2)
    for block_size in (32, 48, 128):  # not timed: words, the H100's choice
        assert _config(num_seqs=64, max_seqlen_k=4096, block_size=block_size).v_as_words
    # Blocks of 64, one per tile: K and V double-buffered (3 stages), V as words, aligned tiles.
    one_block = _config(num_seqs=64, max_seqlen_k=4096, block_size=64)
    assert (one_block.num_stages, one_block.v_as_words, one_block.aligned_tiles) == (3, True, True)
    split = _config()
    assert (split.tile, split.max_registers, split.v_as_words) == (64, 128, True)
    assert _config(head_size=256).max_registers is None
    assert _config(queries_per_kv=32).max_registers is None                # 32 rows
    assert _config(max_seqlen_q=7).max_registers is None                   # prefill
    bf16_cache = _config(kv_fp8=False, q_fp8=False)
    assert (bf16_cache.max_registers, bf16_cache.v_as_words) == (None, False)


def test_launch_config_bf16_q_meets_an_fp8_cache_in_float16_except_in_prefill_over_blocks_of_16():
    assert _config(q_fp8=False).q_as_f16
    assert _config(q_fp8=False, max_seqlen_q=2048, num_seqs=65, num_tokens=2112).q_as_f16
    prefill = dict(max_seqlen_q=4096, max_seqlen_k=4096, num_seqs=4, q_fp8=False)
    assert not _config(**prefill).q_as_f16                          # blocks of 16: measured slower
    assert _config(**prefill, block_size=64).q_as_f16               # 4 x 4096: 2035 -> 1817 us
    assert not _config().q_as_f16                                   # FP8 q
    assert not _config(q_fp8=False, kv_fp8=False).q_as_f16          # bf16 cache
    assert _config(head_size=256).tile == 32       # 256-wide rows: register pressure
    assert _config(max_seqlen_q=64).tile == 64


def test_launch_config_fp8_prefill_takes_128_row_tiles_only_when_queries_are_long():
    long_fp8 = _config(max_seqlen_q=4096, max_seqlen_k=4096, num_seqs=4)
    assert (long_fp8.block_m, long_fp8.tile, long_fp8.num_stages) == (128, 64, 2)
    assert _config(max_seqlen_q=4096, max_seqlen_k=4096, num_seqs=4, q_fp8=False).tile == 64
    assert _config(max_seqlen_q=4096, max_seqlen_k=4096, num_seqs=4, kv_fp8=False, q_fp8=False).block_m == 64
    # One chunk beside 64 decodes: 2112 tokens over 65 sequences is no prefill-heavy batch.
    assert _config(max_seqlen_q=2048, num_seqs=65, num_tokens=2112).block_m == 64
    assert _config(max_seqlen_q=4096, num_seqs=4, head_size=256).block_m == 64


def test_launch_config_runs_whole_tiles_unmasked_except_fp8_split_decode_with_blocks_of_16():
    assert _config(max_seqlen_q=4096, max_seqlen_k=4096, num_seqs=4).unmasked_tiles
    assert _config(num_seqs=64, max_seqlen_k=4096).unmasked_tiles                  # FP8 decode
    split = _config()                                                               # one 32k decode
    assert split.num_segments > 1 and not split.unmasked_tiles
    assert _config(block_size=64).unmasked_tiles
    assert _config(kv_fp8=False, q_fp8=False).unmasked_tiles
    # Unmasked, the FP8-q prefill spilled at 4 warps and ran fastest at 8.
    assert _config(max_seqlen_q=4096, max_seqlen_k=4096, num_seqs=4).num_warps == 8
    assert _config(max_seqlen_q=4096, max_seqlen_k=4096, num_seqs=4, q_fp8=False).num_warps == 4


def test_launch_config_aligns_tiles_of_one_block_where_it_measured_faster():
    prefill = dict(max_seqlen_q=4096, max_seqlen_k=4096, num_seqs=4, num_tokens=4 * 4096, block_size=64)
    assert _config(**prefill).aligned_tiles                                  # FP8 q, 64-key tiles
    assert _config(**prefill, q_fp8=False, kv_fp8=False).aligned_tiles       # bf16
    assert not _config(**prefill, q_fp8=False).aligned_tiles                 # bf16 q, FP8 cache: slower
    assert not _config(**dict(prefill, block_size=16)).aligned_tiles         # blocks of 16: measured slower
    assert _config(num_seqs=64, max_seqlen_k=4096, block_size=64).aligned_tiles
    assert not _config(num_seqs=64, max_seqlen_k=4096).aligned_tiles         # FP8 decode, blocks of 16
    assert not _config(block_size=64).aligned_tiles                          # split-KV: not timed faster
    assert not _config(block_size=64, kv_fp8=False, q_fp8=False, num_seqs=64, max_seqlen_k=4096).aligned_tiles
    mixed = dict(max_seqlen_q=2048, max_seqlen_k=4096, num_seqs=65, num_tokens=2048 + 64, block_size=64)
    assert not _config(**mixed).aligned_tiles


@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("q_fp8", [True, False])
def test_launch_config_long_fp8_split_segments_take_the_whole_sequence_form(block_size, q_fp8):
    whole = _config(num_seqs=64, max_seqlen_k=4096, block_size=block_size, q_fp8=q_fp8)
    form = ("v_as_words", "opaque_block_table", "unmasked_tiles", "aligned_tiles", "num_stages")
    for keys, tiles_per_segment in ((65536, 16), (131072, 32)):    # measured 3-7% faster on the H200
        long = _config(max_seqlen_k=keys, block_size=block_size, q_fp8=q_fp8)
        assert long.num_segments == 64 and -(-keys // 64) // 64 == tiles_per_segment
        assert {f: getattr(long, f) for f in form} == {f: getattr(whole, f) for f in form}
    for keys in (16384, 32768):                                    # 4 and 8 tiles a segment: as before
        short = _config(max_seqlen_k=keys, block_size=block_size, q_fp8=q_fp8)
        assert short.num_segments > 1 and not short.opaque_block_table and short.v_as_words
        assert not short.aligned_tiles and short.unmasked_tiles == (block_size == 64)
    assert not _config(max_seqlen_k=131072, block_size=32).opaque_block_table   # not timed
    assert not _config(max_seqlen_k=131072, kv_fp8=False, q_fp8=False).opaque_block_table


def test_launch_config_block_m_holds_every_query_head_of_a_kv_head():
    assert _config(queries_per_kv=32).block_m == 32
    assert _config(queries_per_kv=64, max_seqlen_q=9).block_m == 64
    assert _config(queries_per_kv=128, max_seqlen_q=9).block_m == 128


TMA_DECODES = ((1, 40), (1, 18), (1, 70))


def _default_config(inputs, path: str) -> LaunchConfig:
    """The configuration unified_attention picks for these inputs."""
    kw = inputs.kernel_kwargs
    return UA.default_launch_config(kw["q"], kw["k"], kw["v"], kw["seqused_k"], kw["max_seqlen_q"],
                                    kw["max_seqlen_k"], split_kv=path == "3d")


@pytest.mark.parametrize("path", ["2d", "3d"])
@pytest.mark.parametrize("feature", [
    dict(),
    dict(q_dtype="bf16"),
    dict(q_dtype="fp16"),
    dict(block_size=48, head_size=80),                    # blocks of 3 tiles; head dims past 80 read as 0
    dict(block_size=64, heads=(16, 1)),                   # 16 query heads per kv head: 16 rows
    dict(window=8),
    dict(softcap=10.0),
    dict(scale_layout="per_seq_head"),
    dict(out_dtype="fp16"),
], ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()) or "plain")
def test_fp8_cache_decode_in_the_one_warp_tma_kernel(feature, path):
    case = make_case(seq_lens=TMA_DECODES, seqs="decode", **feature)
    inputs = build_inputs(case, DEVICE)
    config = _default_config(inputs, path)
    assert config.tma_decode and (config.num_segments > 1) == (path == "3d")
    check(case, path)
    assert torch.equal(run_kernel(inputs, path), run_kernel(inputs, path, config=config))  # what ran


def test_tma_decode_segments_past_a_short_sequence_see_no_key():
    # 32 segments of 16-key tiles over 600 keys: the 9-key sequence leaves 31 of its segments empty.
    case = make_case(seq_lens=((1, 600), (1, 9)), seqs="decode", block_size=32)
    inputs = build_inputs(case, DEVICE)
    config = dataclasses.replace(_default_config(inputs, "3d"), num_segments=32)
    check(case, "3d", config=config)


def test_fp8_cache_decode_where_tma_cannot_read_takes_the_4_warp_kernel():
    case = make_case(seq_lens=TMA_DECODES, seqs="decode", layout="strided")
    inputs = build_inputs(case, DEVICE)
    assert not UA._tma_readable(inputs.kernel_kwargs["k"])
    assert not _default_config(inputs, "2d").tma_decode
    check(case, "2d")
    with pytest.raises(ValueError, match="config.tma_decode: k and v must start and stride in multiples of 16"):
        run_kernel(inputs, "2d", config=LaunchConfig(block_m=8, tile=16, num_segments=1, num_warps=1,
                                                     num_stages=2, tma_decode=True))


def test_tma_decode_config_outside_decode_is_refused():
    inputs = build_inputs(make_case(), DEVICE)                           # mixed: prefill rows
    with pytest.raises(ValueError, match="config.tma_decode: for decode"):
        run_kernel(inputs, "2d", config=LaunchConfig(block_m=8, tile=16, num_segments=1, num_warps=1,
                                                     num_stages=2, tma_decode=True))


def _case_config(case: Case) -> LaunchConfig:
    """The launch configuration a harness case gets (its caches TMA-readable unless strided, as
    test_fp8_cache_decode_where_tma_cannot_read_takes_the_4_warp_kernel checks)."""
    q_lens = [q for q, _ in case.seq_lens]
    return launch_config(max_seqlen_q=max(q_lens), max_seqlen_k=max(kv for _, kv in case.seq_lens),
                         num_tokens=sum(q_lens), num_seqs=len(q_lens), num_kv_heads=case.heads[1],
                         queries_per_kv=case.queries_per_kv, head_size=case.head_size, block_size=case.block_size,
                         q_fp8=case.q_dtype == "fp8", kv_fp8=case.kv_dtype == "fp8", device=torch.device("cpu"),
                         split_kv=case.path == "3d", tma_readable=case.layout != "strided")


def test_the_default_matrix_meets_both_fp8_cache_decode_kernels():
    # FP8-cache decode runs the TMA kernel or, where TMA cannot read the cache (and for head 256 or
    # more than 16 query heads per kv head), the 4-warp one: a matrix edit must not leave either unverified.
    cases = load_suite(Path(__file__).parent.parent / "cases" / "default.yaml").cases
    decode = [c for c in cases if c.kv_dtype == "fp8" and all(q == 1 for q, _ in c.seq_lens)]
    tma = [c for c in decode if _case_config(c).tma_decode]
    four_warp = [c for c in decode if not _case_config(c).tma_decode]
    for group in (tma, four_warp):
        assert {c.path for c in group} == {"2d", "3d"} and {c.q_dtype for c in group} >= {"fp8", "bf16"}
        assert any(c.seqs == "decode_long" for c in group)                   # long split-KV segments
    assert {c.block_size for c in tma} >= {16, 32, 48, 64} and {c.head_size for c in tma} >= {64, 80, 96, 128}
    assert {c.queries_per_kv for c in tma} >= {1, 2, 4, 8}
    for feature in (lambda c: c.window > 0, lambda c: c.softcap > 0, lambda c: c.scale_layout == "per_seq_head",
                    lambda c: c.layout == "exact_table", lambda c: c.q_dtype == "fp16", lambda c: c.out_dtype == "fp16"):
        assert any(feature(c) for c in tma)
    assert any(c.layout == "strided" for c in four_warp) and any(c.head_size == 256 for c in four_warp)


def test_config_with_bad_segments_is_refused(good_kwargs):
    bad = LaunchConfig(block_m=16, tile=64, num_segments=3, num_warps=4, num_stages=3)
    with pytest.raises(ValueError, match="config.num_segments"):
        unified_attention(**good_kwargs, config=bad)


def test_descale_of_one_element_and_per_seq_head_agree_when_equal():
    case = make_case()
    inputs = build_inputs(case, DEVICE)
    a = run_kernel(inputs, "2d")
    num_seqs, num_kv_heads = len(case.seq_lens), case.heads[1]
    expand = {k: inputs.kernel_kwargs[k].expand(num_seqs, num_kv_heads).contiguous()
              for k in ("q_descale", "k_descale", "v_descale")}
    b = run_kernel(inputs, "2d", **expand)
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- bad arguments
@pytest.fixture(scope="module")
def good_kwargs():
    inputs = build_inputs(make_case(), DEVICE)
    return inputs.kernel_kwargs


@pytest.mark.parametrize("name,change,message", [
    ("q", lambda kw: kw["q"][:, :, :32], "q: head_size"),
    ("q", lambda kw: kw["q"][:, :7], "q: num_q_heads 7"),
    ("v", lambda kw: kw["v"].to(torch.bfloat16), "v: dtype"),
    ("out", lambda kw: kw["out"].float(), "out: dtype"),
    ("q_descale", lambda kw: None, "q_descale: required"),
    ("k_descale", lambda kw: None, "k_descale: required"),
    ("v_descale", lambda kw: torch.ones(5, 5, device=kw["q"].device), "v_descale: shape"),
    ("k_descale", lambda kw: kw["k_descale"].double(), "k_descale: must be float32"),
    ("block_table", lambda kw: kw["block_table"].long(), "block_table: must be int32"),
    ("cu_seqlens_q", lambda kw: kw["cu_seqlens_q"][:-1], "cu_seqlens_q: shape"),
    ("window_size", lambda kw: (3,), "window_size"),
    ("softcap", lambda kw: -1.0, "softcap: must be >= 0"),
])
def test_bad_arguments_raise_value_error_naming_the_argument(good_kwargs, name, change, message):
    kwargs = dict(good_kwargs)
    kwargs[name] = change(kwargs)
    if name in ("q",):
        kwargs["out"] = torch.empty(kwargs["q"].shape, dtype=torch.bfloat16, device=kwargs["q"].device)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        unified_attention(**kwargs)


def test_unsupported_dtype_pair(good_kwargs):
    kwargs = dict(good_kwargs, q=good_kwargs["q"].to(torch.bfloat16), k=good_kwargs["k"].to(torch.float16),
                  v=good_kwargs["v"].to(torch.float16))
    with pytest.raises(ValueError, match="q: dtype pair"):
        unified_attention(**kwargs)


def test_block_size_not_multiple_of_8(good_kwargs):
    kwargs = dict(good_kwargs, k=good_kwargs["k"][:, :12], v=good_kwargs["v"][:, :12])
    with pytest.raises(ValueError, match="k: block_size 12"):
        unified_attention(**kwargs)


def test_validation_mode_reads_device_values(good_kwargs):
    bad_table = good_kwargs["block_table"].clone()
    bad_table[0, 0] = good_kwargs["k"].shape[0] + 5
    kwargs = dict(good_kwargs, block_table=bad_table)
    with pytest.raises(ValueError, match="block_table: sequence 0 names a block outside"):
        unified_attention(**kwargs, validate=True)
    short = dict(good_kwargs, block_table=good_kwargs["block_table"][:, :2])
    with pytest.raises(ValueError, match="block_table: 2 columns"):
        unified_attention(**short, validate=True)
