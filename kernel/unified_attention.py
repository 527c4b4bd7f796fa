"""Unified paged attention in Triton: prefill, chunked prefill and decode in one launch path.

Reads top to bottom: helpers, the tile loop, the attention kernel, the FP8-cache decode kernel
(one warp per program, K and V by TMA: decode batches against an FP8 cache that TMA can read),
the split-KV reduction, argument checks, the launcher.

Layouts (vLLM's unified_attention):
  q, out            [num_tokens, num_q_heads, head_size]
  k_cache, v_cache  [num_blocks, block_size, num_kv_heads, head_size]
  block_table       int32 [num_seqs, max_blocks_per_seq]
  cu_seqlens_q      int32 [num_seqs + 1]
  seqused_k         int32 [num_seqs]   kv length of each sequence (context + new tokens)
Query token i of a sequence with query_len tokens sits at position seqused_k - query_len + i.

FP8 scales are folded in through constexpr branches so that non-FP8 paths compile without them:
  Q_FP8:  score scale *= q_scale   (q stays FP8; with an FP8 cache Q.K^T is an FP8 x FP8 dot,
          promoted to float32 every 32 products)
  KV_FP8: score scale *= k_scale,  accumulator *= v_scale in the epilogue
  Q_AS_F16 (bf16 q, FP8 cache, chosen by the launch config): q is rescaled by a power of two into
          float16 so that K widens to float16; the power of two joins the score scale
Each scale is one element or one value per (sequence, kv head); a program serves one of each,
so the scale is a scalar load outside the tile loop either way.

Tiles that every row of a program sees whole (all but the last tile of a decode, all below the
causal diagonal) run in a tile loop of their own without masks (LaunchConfig.unmasked_tiles);
the others, in masked loops before and after it. Where tiles start on block boundaries, keys may
find their block-table entries from the tile index instead of dividing their positions
(LaunchConfig.aligned_tiles).

Precision of P.V: P (probabilities in [0, 1]) is rounded to float16 when V is FP8 (FP8 -> float16
is exact, and float16 keeps 11 significant bits of P, error <= 2^-11 relative), to V's dtype
otherwise. P is never rounded to FP8: that would cost up to 6.25% per probability (3 mantissa
bits) and is what makes FP8-query kernels of this family ~10x less accurate than their inputs.
Accumulation is float32 throughout. cases/tolerances.yaml derives its bounds from this choice.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

FP8 = torch.float8_e4m3fn
SUPPORTED_DTYPES = {  # (q dtype, kv cache dtype)
    (FP8, FP8), (torch.bfloat16, FP8), (torch.float16, FP8),
    (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
}
OUT_DTYPES = (torch.bfloat16, torch.float16)
NO_WINDOW = 1 << 30  # window bound used when a side of window_size is -1 (no int32 overflow)


# ----------------------------------------------------------------------------- helpers
@triton.jit
def _find_seq_idx(cu_seqlens_q_ptr, q_block_global_idx, num_seqs, block_q):
    # Sequence s owns the q blocks starting at cu_seqlens_q[s] // block_q + s: a binary search
    # maps a program to its sequence without a host-side table (no device -> host sync).
    left = 0
    right = num_seqs
    while left < right:
        mid = (left + right) // 2
        mid_start = tl.load(cu_seqlens_q_ptr + mid) // block_q + mid
        if mid_start <= q_block_global_idx:
            left = mid + 1
        else:
            right = mid
    return left - 1


@triton.jit
def _tanh(x):
    # tanh through exp: tl has no tanh that also runs under the interpreter.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _dot(a, b, INTERPRET_SAFE: tl.constexpr):
    # The interpreter multiplies bfloat16 bit patterns in tl.dot; float32 operands give the
    # exact product of the same (already rounded) values, so results match the GPU path.
    if INTERPRET_SAFE:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    return tl.dot(a, b)


@triton.jit
def _cast(x, DTYPE: tl.constexpr, INTERPRET_SAFE: tl.constexpr):
    # The interpreter truncates float32 -> bfloat16 (the GPU rounds to nearest even); rounding
    # the bits first makes its truncation exact. Finite inputs only, which is all we cast.
    if INTERPRET_SAFE:
        if DTYPE == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


@triton.jit
def _fp8_words_to_f16(words, ROWS: tl.constexpr, COLS: tl.constexpr):
    # words[r, j] packs the four e4m3 values of columns 4j..4j+3 (little-endian). Widening each
    # byte pair with one cvt (exact) and interleaving the four results restores column order.
    c0, c1, c2, c3 = tl.inline_asm_elementwise(
        "{ .reg .b16 lo, hi; .reg .b32 a, b;\n"
        "mov.b32 {lo, hi}, $4;\n"
        "cvt.rn.f16x2.e4m3x2 a, lo;\n"
        "cvt.rn.f16x2.e4m3x2 b, hi;\n"
        "mov.b32 {$0, $1}, a;\n"
        "mov.b32 {$2, $3}, b; }",
        "=h,=h,=h,=h,r", [words], dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
        is_pure=True, pack=1)
    return tl.reshape(tl.join(tl.join(c0, c2), tl.join(c1, c3)), (ROWS, COLS))


@triton.jit
def _fold_score_scale(q, softmax_scale, q_scale_ptr, k_scale_ptr, seq_idx, kv_head, stride_qs_seq, stride_qs_head,
                      stride_ks_seq, stride_ks_head, Q_FP8: tl.constexpr, KV_FP8: tl.constexpr,
                      Q_AS_F16: tl.constexpr, USE_SOFTCAP: tl.constexpr):
    """(q, qk_scale): every score factor folded into one scalar before the tile loop."""
    qk_scale = softmax_scale
    if Q_AS_F16:
        # bf16 q against an FP8 cache: K widens to float16 in one instruction (to bfloat16 in
        # three), so q moves to float16 instead, scaled by the power of two that puts its largest
        # magnitude in [1, 2). Exact for every element within 2^17 of that maximum; smaller ones
        # lose bits below 2^-25 of it, an absolute score error far below float32 accumulation's.
        # The scale comes back exactly through qk_scale.
        q_f32 = q.to(tl.float32)
        q_exp = ((tl.max(tl.max(tl.abs(q_f32), 1), 0).to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        q_exp = tl.minimum(tl.maximum(q_exp, -126), 126)
        q = (q_f32 * ((127 - q_exp) << 23).to(tl.float32, bitcast=True)).to(tl.float16)
        qk_scale *= ((127 + q_exp) << 23).to(tl.float32, bitcast=True)
    if Q_FP8:
        qk_scale *= tl.load(q_scale_ptr + seq_idx * stride_qs_seq + kv_head * stride_qs_head)
    if KV_FP8:
        qk_scale *= tl.load(k_scale_ptr + seq_idx * stride_ks_seq + kv_head * stride_ks_head)
    if not USE_SOFTCAP:
        qk_scale *= 1.44269504  # 1/ln(2): scores in log2 units, so exp2 below
    return q, qk_scale


@triton.jit
def _segment_tiles(tile_lo, tile_hi, seq_len, segment, num_segments, TILE: tl.constexpr):
    """A split-KV segment's share of tiles tile_lo .. tile_hi - 1: the sequence's tiles cut into
    num_segments runs of equal length (the last ones may be empty)."""
    tiles_per_segment = tl.cdiv(tl.cdiv(seq_len, TILE), num_segments)
    return tl.maximum(tile_lo, segment * tiles_per_segment), tl.minimum(tile_hi, (segment + 1) * tiles_per_segment)


@triton.jit
def _load_block_numbers(row_start, kv_pos, kv_valid, last_block, BLOCK_SIZE: tl.constexpr, OPAQUE: tl.constexpr):
    # Triton's software pipeliner gives a load that feeds other loads' addresses a pipeline stage
    # of its own: on the decode tiling, num_stages=3 stages the block table through shared memory
    # and still single-buffers K and V. Loaded through inline assembly, the block numbers are
    # invisible to it and its stages go to K and V alone (there, two K and two V tiles in flight;
    # scripts/sass_report.py lists the buffers). The block table is read-only here (.nc).
    if OPAQUE:
        # Inline assembly takes no mask: keys past kv_end read entry 0 of the row (every sequence
        # that has a tile has one); their K and V loads are masked. Nor does the pipeliner
        # predicate it: its prologue runs it for a loop's first tile even where the loop is
        # empty, and the unmasked loop's tiles read every entry of theirs. A decode shorter than
        # a tile thus read past its sequence's blocks, past the table for the last row (on the
        # H200, compute-sanitizer's memcheck with a table exactly as wide as needed), and an
        # empty split-KV segment up to a row further. Clamped to the sequence's last block, each
        # read stays in its row; the K and V loads of such tiles are predicated off. (A clamp per
        # tile lost the pointer's induction: 537 -> 701 loop instructions, FP8 decode, blocks of 16.)
        ptrs = row_start + tl.minimum(tl.where(kv_valid, kv_pos, 0) // BLOCK_SIZE, last_block)
        return tl.inline_asm_elementwise("ld.global.nc.b32 $0, [$1];", "=r,l", [ptrs],
                                         dtype=tl.int32, is_pure=True, pack=1)
    # In masked tiles the visible load keeps its mask (whole tiles pass an all-true one, folded
    # away): clamped like the one above, the one-loop FP8-cache decode with blocks of 16 compiled
    # to 40 bytes of spill against 24 and measured 7-11% slower on the H200
    # (python -m bench.compare results/h200/bench_before.json results/h200/bench_6559381.json).
    return tl.load(row_start + kv_pos // BLOCK_SIZE, mask=kv_valid, other=0)


# ----------------------------------------------------------------------------- tile loop
@triton.jit
def _attend_tile(
    acc, m_i, l_i, q, tile, kv_end, q_abs, row_valid, qk_scale, softcap,             #
    window_left, window_right, kv_cache, offs_d, offs_n, d_valid,                    #
    HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
    Q_FP8: tl.constexpr, V_WORDS: tl.constexpr, PV_DTYPE: tl.constexpr, FP8_PROMOTE_K: tl.constexpr,
    CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr,      #
    OPAQUE_BT: tl.constexpr, ALIGNED_TILES: tl.constexpr, MASKED: tl.constexpr,      #
    INTERPRET_SAFE: tl.constexpr,                                                    #
):
    """One kv tile of the online softmax: returns the updated (acc, m_i, l_i). MASKED: some row
    must not see some key of the tile (past the sequence, the causal diagonal, the window's
    edges); without it every key is visible to every row and no mask is computed. kv_cache: where
    this program's keys and values live (the kernel's tuple, unpacked here)."""
    (k_ptr, v_ptr, block_table_ptr, seq_idx, stride_bt_seq, last_block, kv_head_off, stride_k_blk, stride_k_tok,
     stride_k_head, stride_v_blk, stride_v_tok, stride_v_head) = kv_cache
    kv_pos = tile * TILE + offs_n
    if MASKED:
        kv_valid = kv_pos < kv_end
    else:
        kv_valid = offs_n < TILE  # all true: folded away
    # -- gather this tile's keys and values through the block table (64-bit offsets) --
    # Each branch writes its own call: shared after the branch, the call compiles the variants
    # without aligned tiles to other machine code (the same counts, registers in another order)
    # than the code timed on the H200 (scripts/sass_diff.py).
    if ALIGNED_TILES:
        # Tiles start on block boundaries (TILE % BLOCK_SIZE == 0): a key's block and slot follow
        # from its place in the tile, a constant, instead of dividing its position per key (the
        # block index goes in as a position in blocks of 1).
        phys_block = _load_block_numbers(block_table_ptr + seq_idx * stride_bt_seq,
                                         tile * (TILE // BLOCK_SIZE) + offs_n // BLOCK_SIZE, kv_valid, last_block,
                                         1, OPAQUE_BT).to(tl.int64)
        in_block = (offs_n % BLOCK_SIZE).to(tl.int64)
    else:
        phys_block = _load_block_numbers(block_table_ptr + seq_idx * stride_bt_seq, kv_pos, kv_valid, last_block,
                                         BLOCK_SIZE, OPAQUE_BT).to(tl.int64)
        in_block = (kv_pos % BLOCK_SIZE).to(tl.int64)
    k = tl.load(k_ptr + phys_block[None, :] * stride_k_blk + in_block[None, :] * stride_k_tok
                + kv_head_off * stride_k_head + offs_d[:, None],
                mask=d_valid[:, None] & kv_valid[None, :], other=0.0)
    v_row = phys_block[:, None] * stride_v_blk + in_block[:, None] * stride_v_tok + kv_head_off * stride_v_head
    if V_WORDS:
        # An FP8 V is P.V's B operand, whose 8-bit register layout wants keys contiguous; the
        # cache has the head dim contiguous. Loaded as bytes, V is transposed byte by byte out of
        # shared memory (64 LDS.U8 per thread and 64-key tile); loaded as 32-bit words and widened
        # here, it is transposed in 16 bits by ldmatrix, and the decode tiling fits 128 registers
        # without spilling (4 programs per SM).
        offs_w = tl.arange(0, HEAD_PAD // 4)
        words = tl.load(v_ptr.to(tl.pointer_type(tl.int32)) + v_row // 4 + offs_w[None, :],
                        mask=kv_valid[:, None] & (offs_w < HEAD_SIZE // 4)[None, :], other=0)
        v = _fp8_words_to_f16(words, TILE, HEAD_PAD)
    else:
        v = tl.load(v_ptr + v_row + offs_d[None, :], mask=kv_valid[:, None] & d_valid[None, :], other=0.0)

    # -- compute qk --
    if Q_FP8:
        # FP8 x FP8 products are exact, but Hopper's FP8 tensor cores accumulate in reduced
        # precision (Triton's sm_90 default never promotes): measured score errors of ~3e-3 at
        # head size 256 put output errors of 1e-2 on the H100. Promoting to float32 every
        # FP8_PROMOTE_K products keeps the sum float32-accurate.
        s = tl.dot(q, k, max_num_imprecise_acc=FP8_PROMOTE_K)
    else:
        s = _dot(q, k.to(q.dtype), INTERPRET_SAFE)  # FP8 -> 16-bit is exact
    s = s * qk_scale
    if USE_SOFTCAP:
        s = (softcap * 1.44269504) * _tanh(s / softcap)

    if MASKED:
        visible = row_valid[:, None] & kv_valid[None, :]
        if CAUSAL:
            visible &= kv_pos[None, :] <= q_abs[:, None]
        if USE_WINDOW:
            visible &= (kv_pos[None, :] >= q_abs[:, None] - window_left) & \
                       (kv_pos[None, :] <= q_abs[:, None] + window_right)
        s = tl.where(visible, s, float("-inf"))

    # -- online softmax --
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked rows stay at 0
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc += _dot(_cast(p, PV_DTYPE, INTERPRET_SAFE), v.to(PV_DTYPE), INTERPRET_SAFE)
    m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attend_tiles(
    acc, m_i, l_i, q, tile_lo, tile_hi, kv_end, q_abs, row_valid, qk_scale, softcap,  #
    window_left, window_right, kv_cache, offs_d, offs_n, d_valid,                    #
    HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
    Q_FP8: tl.constexpr, V_WORDS: tl.constexpr, PV_DTYPE: tl.constexpr, FP8_PROMOTE_K: tl.constexpr,
    CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr,      #
    OPAQUE_BT: tl.constexpr, ALIGNED_TILES: tl.constexpr, MASKED: tl.constexpr,      #
    INTERPRET_SAFE: tl.constexpr,                                                    #
):
    """Tiles tile_lo .. tile_hi - 1 of the online softmax, all MASKED or all not."""
    # The interpreter (triton 3.6) cannot take loaded values as range() bounds, so it walks the
    # same tiles with a while loop; the GPU keeps the for loop, which Triton software-pipelines.
    if INTERPRET_SAFE:
        tile = tile_lo
        while tile < tile_hi:
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, tile, kv_end, q_abs, row_valid, qk_scale, softcap,
                window_left, window_right, kv_cache, offs_d, offs_n, d_valid,
                HEAD_SIZE, HEAD_PAD, BLOCK_SIZE, TILE, Q_FP8, V_WORDS, PV_DTYPE, FP8_PROMOTE_K,
                CAUSAL, USE_WINDOW, USE_SOFTCAP, OPAQUE_BT, ALIGNED_TILES, MASKED, INTERPRET_SAFE)
            tile += 1
    else:
        for tile in range(tile_lo, tile_hi):
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, tile, kv_end, q_abs, row_valid, qk_scale, softcap,
                window_left, window_right, kv_cache, offs_d, offs_n, d_valid,
                HEAD_SIZE, HEAD_PAD, BLOCK_SIZE, TILE, Q_FP8, V_WORDS, PV_DTYPE, FP8_PROMOTE_K,
                CAUSAL, USE_WINDOW, USE_SOFTCAP, OPAQUE_BT, ALIGNED_TILES, MASKED, INTERPRET_SAFE)
    return acc, m_i, l_i


# ----------------------------------------------------------------------------- kernels
# Values that differ between calls but gain nothing from specialization stay runtime arguments,
# so one compiled variant serves them all (Triton would otherwise specialize on ==1 and %16).
# HEAD_SIZE stays constexpr: as a runtime value its mask stops the loads from vectorizing
# (measured on the H100: decode 2x slower, prefill spilling).
@triton.jit(do_not_specialize=["num_seqs", "num_q_heads", "queries_per_kv", "block_q", "num_segments",
                               "window_left", "window_right", "stride_bt_seq",
                               "stride_qs_seq", "stride_qs_head", "stride_ks_seq", "stride_ks_head",
                               "stride_vs_seq", "stride_vs_head"])
def _unified_attention_kernel(
    out_ptr, seg_acc_ptr, seg_max_ptr, seg_sum_ptr,                          #
    q_ptr, k_ptr, v_ptr,                                                     #
    block_table_ptr, seqused_k_ptr, cu_seqlens_q_ptr, num_seqs,              #
    q_scale_ptr, k_scale_ptr, v_scale_ptr,                                   #
    stride_qs_seq, stride_qs_head, stride_ks_seq, stride_ks_head,            #
    stride_vs_seq, stride_vs_head,                                           #
    softmax_scale, softcap, window_left, window_right,                        #
    stride_q_tok, stride_q_head,                                             #
    stride_o_tok, stride_o_head,                                             #
    stride_k_blk, stride_k_tok, stride_k_head,                               #
    stride_v_blk, stride_v_tok, stride_v_head,                               #
    stride_bt_seq,                                                           #
    num_q_heads, queries_per_kv, block_q, num_segments,                      #
    HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr,                         #
    BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, BLOCK_M: tl.constexpr,     #
    Q_FP8: tl.constexpr, KV_FP8: tl.constexpr, Q_AS_F16: tl.constexpr,       #
    V_WORDS: tl.constexpr, PV_DTYPE: tl.constexpr, FP8_PROMOTE_K: tl.constexpr,
    CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    SPLIT_KV: tl.constexpr, OPAQUE_BT: tl.constexpr, UNMASKED_TILES: tl.constexpr,
    ALIGNED_TILES: tl.constexpr,
    INTERPRET_SAFE: tl.constexpr,
):
    q_block_global_idx = tl.program_id(0)
    kv_head = tl.program_id(1)
    segment = tl.program_id(2)

    seq_idx = _find_seq_idx(cu_seqlens_q_ptr, q_block_global_idx, num_seqs, block_q)
    q_start = tl.load(cu_seqlens_q_ptr + seq_idx)
    q_len = tl.load(cu_seqlens_q_ptr + seq_idx + 1) - q_start
    q_block_local = q_block_global_idx - (q_start // block_q + seq_idx)
    if q_block_local * block_q >= q_len:
        return
    seq_len = tl.load(seqused_k_ptr + seq_idx)
    context_len = seq_len - q_len

    # Row m of the tile is query token m // queries_per_kv of this block, for the
    # m % queries_per_kv-th query head sharing this kv head (GQA packs heads into M). The head
    # ratio and block_q are runtime values: they are used once per program, not per tile.
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_PAD)
    offs_n = tl.arange(0, TILE)
    q_pos = q_block_local * block_q + offs_m // queries_per_kv
    q_head = kv_head * queries_per_kv + offs_m % queries_per_kv
    row_valid = (offs_m < block_q * queries_per_kv) & (q_pos < q_len)
    d_valid = offs_d < HEAD_SIZE
    q_tok = (q_start + q_pos).to(tl.int64)
    q = tl.load(q_ptr + q_tok[:, None] * stride_q_tok + q_head[:, None] * stride_q_head + offs_d[None, :],
                mask=row_valid[:, None] & d_valid[None, :], other=0.0)

    q, qk_scale = _fold_score_scale(q, softmax_scale, q_scale_ptr, k_scale_ptr, seq_idx, kv_head, stride_qs_seq,
                                    stride_qs_head, stride_ks_seq, stride_ks_head, Q_FP8, KV_FP8, Q_AS_F16, USE_SOFTCAP)
    q_abs = context_len + q_pos  # absolute position of each row's token

    # -- the kv range this program must visit --
    last_q = tl.minimum((q_block_local + 1) * block_q, q_len) - 1
    kv_end = seq_len
    if CAUSAL:
        kv_end = tl.minimum(kv_end, context_len + last_q + 1)
    kv_start = 0
    if USE_WINDOW:
        kv_end = tl.minimum(kv_end, context_len + last_q + window_right + 1)
        kv_start = tl.maximum(context_len + q_block_local * block_q - window_left, 0)
    tile_lo = kv_start // TILE
    tile_hi = tl.cdiv(kv_end, TILE)
    if SPLIT_KV:
        tile_lo, tile_hi = _segment_tiles(tile_lo, tile_hi, seq_len, segment, num_segments, TILE)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    kv_head_off = kv_head.to(tl.int64)
    last_block = tl.maximum(tl.cdiv(seq_len, BLOCK_SIZE) - 1, 0)  # the sequence's row has entries 0..last_block
    kv_cache = (k_ptr, v_ptr, block_table_ptr, seq_idx, stride_bt_seq, last_block, kv_head_off, stride_k_blk,
                stride_k_tok, stride_k_head, stride_v_blk, stride_v_tok, stride_v_head)
    # Tiles whose every key every row sees (none past the sequence, the causal diagonal or the
    # window's edges) run in a loop of their own without masks (UNMASKED_TILES): all but the last
    # tile of a decode, all below the diagonal of a causal prefill. Masked loops take the window's
    # leading edge before them and the rest after them; without UNMASKED_TILES, one masked loop.
    whole_hi = tile_lo
    if UNMASKED_TILES:
        first_q_abs = context_len + q_block_local * block_q
        whole_end = seq_len
        if CAUSAL:
            whole_end = tl.minimum(whole_end, first_q_abs + 1)
        whole_lo = tile_lo
        if USE_WINDOW:
            whole_end = tl.minimum(whole_end, first_q_abs + window_right + 1)
            whole_lo = tl.minimum(tl.maximum(tl.cdiv(context_len + last_q - window_left, TILE), tile_lo), tile_hi)
            acc, m_i, l_i = _attend_tiles(
                acc, m_i, l_i, q, tile_lo, whole_lo, kv_end, q_abs, row_valid, qk_scale, softcap,
                window_left, window_right, kv_cache, offs_d, offs_n, d_valid,
                HEAD_SIZE, HEAD_PAD, BLOCK_SIZE, TILE, Q_FP8, V_WORDS, PV_DTYPE, FP8_PROMOTE_K,
                CAUSAL, USE_WINDOW, USE_SOFTCAP, OPAQUE_BT, ALIGNED_TILES, True, INTERPRET_SAFE)
        whole_hi = tl.minimum(tl.maximum(whole_end // TILE, whole_lo), tile_hi)
        acc, m_i, l_i = _attend_tiles(
            acc, m_i, l_i, q, whole_lo, whole_hi, kv_end, q_abs, row_valid, qk_scale, softcap,
            window_left, window_right, kv_cache, offs_d, offs_n, d_valid,
            HEAD_SIZE, HEAD_PAD, BLOCK_SIZE, TILE, Q_FP8, V_WORDS, PV_DTYPE, FP8_PROMOTE_K,
            CAUSAL, USE_WINDOW, USE_SOFTCAP, OPAQUE_BT, ALIGNED_TILES, False, INTERPRET_SAFE)
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, whole_hi, tile_hi, kv_end, q_abs, row_valid, qk_scale, softcap,
        window_left, window_right, kv_cache, offs_d, offs_n, d_valid,
        HEAD_SIZE, HEAD_PAD, BLOCK_SIZE, TILE, Q_FP8, V_WORDS, PV_DTYPE, FP8_PROMOTE_K,
        CAUSAL, USE_WINDOW, USE_SOFTCAP, OPAQUE_BT, ALIGNED_TILES, True, INTERPRET_SAFE)

    # epilogue
    if KV_FP8:
        acc *= tl.load(v_scale_ptr + seq_idx * stride_vs_seq + kv_head * stride_vs_head)
    if not SPLIT_KV:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + q_tok[:, None] * stride_o_tok + q_head[:, None] * stride_o_head + offs_d[None, :],
                 _cast(out, out_ptr.dtype.element_ty, INTERPRET_SAFE), mask=row_valid[:, None] & d_valid[None, :])
    else:
        # Partial results of this segment: unnormalized acc, running max and sum per row.
        row = (q_tok * num_q_heads + q_head) * num_segments + segment
        tl.store(seg_acc_ptr + row[:, None] * HEAD_PAD + offs_d[None, :], acc, mask=row_valid[:, None])
        tl.store(seg_max_ptr + row, m_i, mask=row_valid)
        tl.store(seg_sum_ptr + row, l_i, mask=row_valid)


# ----------------------------------------------------------------------------- FP8-cache decode kernel
# Decode against an FP8 cache runs its own kernel (LaunchConfig.tma_decode): one warp per program
# and (sequence, kv head, segment), keys as the MMA's M (S^T = K q^T, O^T = V^T P^T, so that a
# tile is one 16-key TMA box and the query heads, at most 16 rows, are N), and K and V copied
# into shared memory by TMA (num_stages=6: two tiles in flight), with no address arithmetic
# per key. The latency-bound tile loop of the 4-warp kernel above (four programs per SM, each
# waiting on its loads) becomes many small programs whose loads the TMA unit keeps in flight: on
# the H200, 64 x 4096 FP8-cache decode 186-203 -> 152-158 us (results/h200/RESULTS.md, "One-warp
# TMA decode").
@triton.jit
def _decode_tile(
    accT, m_i, l_i, qT, tile, kv_start, seq_len, row_start, kv_head, k_desc, v_desc, qk_scale, softcap, offs_n,
    HEAD_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, Q_FP8: tl.constexpr,
    USE_SOFTCAP: tl.constexpr, MASKED: tl.constexpr, INTERPRET_SAFE: tl.constexpr,
):
    """One tile of TILE keys (slots of one block) of the transposed online softmax."""
    blk = tl.load(row_start + tile // (BLOCK_SIZE // TILE))
    slot = (tile % (BLOCK_SIZE // TILE)) * TILE
    # The descriptors' boxes are [1, TILE, 1, HEAD_PAD]: head dims past head_size read as zeros.
    k = tl.reshape(k_desc.load([blk, slot, kv_head, 0]), (TILE, HEAD_PAD))
    v = tl.reshape(v_desc.load([blk, slot, kv_head, 0]), (TILE, HEAD_PAD)).to(tl.float16)  # exact
    if Q_FP8:
        # [TILE, BLOCK_M]. Compiled for sm_90 (scripts/sass_report.py) this MMA widens both FP8
        # operands to float16 (exact) and accumulates in float32 (HMMA.16816.F32): no wgmma, so no
        # reduced-precision FP8 accumulation to promote out of (FP8_PROMOTE_K).
        s = tl.dot(k, qT)
    else:
        s = _dot(k.to(qT.dtype), qT, INTERPRET_SAFE)  # FP8 -> 16-bit is exact
    s = s * qk_scale
    if USE_SOFTCAP:
        s = (softcap * 1.44269504) * _tanh(s / softcap)
    if MASKED:
        kv_pos = tile * TILE + offs_n
        visible = (kv_pos >= kv_start) & (kv_pos < seq_len)
        s = tl.where(visible[:, None], s, float("-inf"))
        v = tl.where(visible[:, None], v, 0.0)  # slots past the sequence may hold NaN: 0 * NaN = NaN
    m_new = tl.maximum(m_i, tl.max(s, 0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a segment that sees no key stays at 0
    p = tl.math.exp2(s - m_safe[None, :])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 0)
    accT = accT * alpha[None, :] + _dot(tl.trans(v), _cast(p, tl.float16, INTERPRET_SAFE), INTERPRET_SAFE)
    return accT, m_new, l_i


@triton.jit
def _decode_tiles(
    accT, m_i, l_i, qT, tile_lo, tile_hi, kv_start, seq_len, row_start, kv_head, k_desc, v_desc, qk_scale, softcap,
    offs_n, HEAD_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, Q_FP8: tl.constexpr,
    USE_SOFTCAP: tl.constexpr, MASKED: tl.constexpr, INTERPRET_SAFE: tl.constexpr,
):
    """Tiles tile_lo .. tile_hi - 1 (a while loop under the interpreter, as in _attend_tiles)."""
    if INTERPRET_SAFE:
        tile = tile_lo
        while tile < tile_hi:
            accT, m_i, l_i = _decode_tile(accT, m_i, l_i, qT, tile, kv_start, seq_len, row_start, kv_head, k_desc,
                                          v_desc, qk_scale, softcap, offs_n, HEAD_PAD, BLOCK_SIZE, TILE, Q_FP8,
                                          USE_SOFTCAP, MASKED, INTERPRET_SAFE)
            tile += 1
    else:
        for tile in range(tile_lo, tile_hi):
            accT, m_i, l_i = _decode_tile(accT, m_i, l_i, qT, tile, kv_start, seq_len, row_start, kv_head, k_desc,
                                          v_desc, qk_scale, softcap, offs_n, HEAD_PAD, BLOCK_SIZE, TILE, Q_FP8,
                                          USE_SOFTCAP, MASKED, INTERPRET_SAFE)
    return accT, m_i, l_i


@triton.jit(do_not_specialize=["num_q_heads", "queries_per_kv", "num_segments", "window_left", "stride_bt_seq",
                               "stride_qs_seq", "stride_qs_head", "stride_ks_seq", "stride_ks_head",
                               "stride_vs_seq", "stride_vs_head"])
def _fp8_decode_kernel(
    out_ptr, seg_acc_ptr, seg_max_ptr, seg_sum_ptr,                          #
    q_ptr, k_desc, v_desc,                                                   #
    block_table_ptr, seqused_k_ptr, cu_seqlens_q_ptr,                        #
    q_scale_ptr, k_scale_ptr, v_scale_ptr,                                   #
    stride_qs_seq, stride_qs_head, stride_ks_seq, stride_ks_head,            #
    stride_vs_seq, stride_vs_head,                                           #
    softmax_scale, softcap, window_left,                                     #
    stride_q_tok, stride_q_head, stride_o_tok, stride_o_head, stride_bt_seq,  #
    num_q_heads, queries_per_kv, num_segments,                               #
    HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr,                         #
    BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, BLOCK_M: tl.constexpr,     #
    Q_FP8: tl.constexpr, Q_AS_F16: tl.constexpr,                             #
    USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr, SPLIT_KV: tl.constexpr,
    INTERPRET_SAFE: tl.constexpr,
):
    seq_idx = tl.program_id(0)
    kv_head = tl.program_id(1)
    segment = tl.program_id(2)
    q_tok = tl.load(cu_seqlens_q_ptr + seq_idx)
    if tl.load(cu_seqlens_q_ptr + seq_idx + 1) == q_tok:
        return  # a sequence with no query token in this batch
    seq_len = tl.load(seqused_k_ptr + seq_idx)

    # Row m is query head m of this kv head's queries_per_kv; they are the MMA's N (q^T).
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_PAD)
    offs_n = tl.arange(0, TILE)
    q_head = kv_head * queries_per_kv + offs_m
    row_valid = offs_m < queries_per_kv
    d_valid = offs_d < HEAD_SIZE
    q = tl.load(q_ptr + q_tok.to(tl.int64) * stride_q_tok + q_head[:, None] * stride_q_head + offs_d[None, :],
                mask=row_valid[:, None] & d_valid[None, :], other=0.0)
    q, qk_scale = _fold_score_scale(q, softmax_scale, q_scale_ptr, k_scale_ptr, seq_idx, kv_head, stride_qs_seq,
                                    stride_qs_head, stride_ks_seq, stride_ks_head, Q_FP8, True, Q_AS_F16, USE_SOFTCAP)
    qT = tl.trans(q)

    # -- the kv range: the window's first key .. the last key; a segment's share of its tiles --
    kv_start = 0
    if USE_WINDOW:
        kv_start = tl.maximum(seq_len - 1 - window_left, 0)
    tile_lo = kv_start // TILE
    tile_hi = tl.cdiv(seq_len, TILE)
    if SPLIT_KV:
        tile_lo, tile_hi = _segment_tiles(tile_lo, tile_hi, seq_len, segment, num_segments, TILE)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    accT = tl.zeros([HEAD_PAD, BLOCK_M], tl.float32)
    row_start = block_table_ptr + seq_idx * stride_bt_seq
    # Whole tiles (every key inside the window and the sequence) need no mask; masked loops take
    # the window's leading edge before them and the last partial tile after them.
    whole_lo = tile_lo
    if USE_WINDOW:
        whole_lo = tl.minimum(tl.maximum(tl.cdiv(kv_start, TILE), tile_lo), tile_hi)
        accT, m_i, l_i = _decode_tiles(accT, m_i, l_i, qT, tile_lo, whole_lo, kv_start, seq_len, row_start, kv_head,
                                       k_desc, v_desc, qk_scale, softcap, offs_n, HEAD_PAD, BLOCK_SIZE, TILE, Q_FP8,
                                       USE_SOFTCAP, True, INTERPRET_SAFE)
    whole_hi = tl.maximum(tl.minimum(seq_len // TILE, tile_hi), whole_lo)
    accT, m_i, l_i = _decode_tiles(accT, m_i, l_i, qT, whole_lo, whole_hi, kv_start, seq_len, row_start, kv_head,
                                   k_desc, v_desc, qk_scale, softcap, offs_n, HEAD_PAD, BLOCK_SIZE, TILE, Q_FP8,
                                   USE_SOFTCAP, False, INTERPRET_SAFE)
    accT, m_i, l_i = _decode_tiles(accT, m_i, l_i, qT, whole_hi, tile_hi, kv_start, seq_len, row_start, kv_head,
                                   k_desc, v_desc, qk_scale, softcap, offs_n, HEAD_PAD, BLOCK_SIZE, TILE, Q_FP8,
                                   USE_SOFTCAP, True, INTERPRET_SAFE)

    acc = tl.trans(accT) * tl.load(v_scale_ptr + seq_idx * stride_vs_seq + kv_head * stride_vs_head)
    if not SPLIT_KV:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + q_tok.to(tl.int64) * stride_o_tok + q_head[:, None] * stride_o_head + offs_d[None, :],
                 _cast(out, out_ptr.dtype.element_ty, INTERPRET_SAFE), mask=row_valid[:, None] & d_valid[None, :])
    else:
        # Partial results of this segment, laid out as the 4-warp kernel's for _reduce_segments_kernel.
        row = (q_tok.to(tl.int64) * num_q_heads + q_head) * num_segments + segment
        tl.store(seg_acc_ptr + row[:, None] * HEAD_PAD + offs_d[None, :], acc, mask=row_valid[:, None])
        tl.store(seg_max_ptr + row, m_i, mask=row_valid)
        tl.store(seg_sum_ptr + row, l_i, mask=row_valid)


@triton.jit(do_not_specialize=["num_seqs", "num_q_heads"])
def _reduce_segments_kernel(
    out_ptr, seg_acc_ptr, seg_max_ptr, seg_sum_ptr, cu_seqlens_q_ptr, num_seqs,
    stride_o_tok, stride_o_head, num_q_heads,                                #
    HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr, NUM_SEGMENTS: tl.constexpr,
    INTERPRET_SAFE: tl.constexpr,                                            #
):
    # One program per (token, query head): rescale every segment to the common max and sum.
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    if tok >= tl.load(cu_seqlens_q_ptr + num_seqs):
        return  # padding rows past the last sequence: no segment wrote them, leave out alone
    offs_s = tl.arange(0, NUM_SEGMENTS)
    offs_d = tl.arange(0, HEAD_PAD)
    row = (tok * num_q_heads + head) * NUM_SEGMENTS + offs_s
    m = tl.load(seg_max_ptr + row)
    l = tl.load(seg_sum_ptr + row)
    m_all = tl.max(m, 0)
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
    w = tl.math.exp2(m - m_all)  # a segment that saw no key has m = -inf: weight 0
    l_all = tl.sum(l * w, 0)
    acc = tl.load(seg_acc_ptr + row[:, None] * HEAD_PAD + offs_d[None, :])
    out = tl.sum(acc * w[:, None], 0) / tl.where(l_all == 0.0, 1.0, l_all)
    tl.store(out_ptr + tok * stride_o_tok + head * stride_o_head + offs_d,
             _cast(out, out_ptr.dtype.element_ty, INTERPRET_SAFE), mask=offs_d < HEAD_SIZE)


# ----------------------------------------------------------------------------- argument checks
def _scale_strides(name, scale, num_seqs, num_kv_heads, device):
    """(stride over sequences, stride over kv heads) of a descale: 0, 0 for one element."""
    if scale.dtype != torch.float32:
        raise ValueError(f"{name}: must be float32, got {scale.dtype}")
    if scale.device != device:
        raise ValueError(f"{name}: on {scale.device}, q is on {device}")
    if scale.numel() == 1:
        return 0, 0
    if tuple(scale.shape) != (num_seqs, num_kv_heads):
        raise ValueError(f"{name}: shape {tuple(scale.shape)}, expected one element or "
                         f"[num_seqs, num_kv_heads] = [{num_seqs}, {num_kv_heads}]")
    return scale.stride(0), scale.stride(1)


def _check_arguments(q, k, v, out, cu_seqlens_q, seqused_k, block_table, window_size, softcap,
                     q_descale, k_descale, v_descale):
    """Shape, dtype and presence checks that need no device values; raise ValueError naming the argument.
    Each message is formatted only on failure: these checks run on every launch."""
    def fail(name, msg):
        raise ValueError(f"{name}: {msg}")

    if q.dim() != 3:
        fail("q", f"expected [num_tokens, num_q_heads, head_size], got shape {tuple(q.shape)}")
    if k.dim() != 4:
        fail("k", f"expected [num_blocks, block_size, num_kv_heads, head_size], got shape {tuple(k.shape)}")
    if v.shape != k.shape:
        fail("v", f"shape {tuple(v.shape)} differs from k's {tuple(k.shape)}")
    if v.dtype != k.dtype:
        fail("v", f"dtype {v.dtype} differs from k's {k.dtype}")
    if out.shape != q.shape:
        fail("out", f"shape {tuple(out.shape)} differs from q's {tuple(q.shape)}")
    if out.dtype not in OUT_DTYPES:
        fail("out", f"dtype must be bfloat16 or float16, got {out.dtype}")
    if (q.dtype, k.dtype) not in SUPPORTED_DTYPES:
        fail("q", f"dtype pair (q={q.dtype}, kv={k.dtype}) is not supported")
    num_blocks, block_size, num_kv_heads, head_size = k.shape
    if q.shape[2] != head_size:
        fail("q", f"head_size {q.shape[2]} differs from the cache's {head_size}")
    if not 16 <= head_size <= 256:
        fail("q", f"head_size {head_size} outside [16, 256]")
    if q.shape[1] % num_kv_heads:
        fail("q", f"num_q_heads {q.shape[1]} is not a multiple of num_kv_heads {num_kv_heads}")
    if block_size % 8:
        fail("k", f"block_size {block_size} is not a multiple of 8")
    device = q.device
    for name, t in (("q", q), ("k", k), ("v", v), ("out", out)):
        if t.stride(-1) != 1:
            fail(name, "last dimension must be contiguous")
        if t.device != device:
            fail(name, f"on {t.device}, q is on {device}")
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("seqused_k", seqused_k), ("block_table", block_table)):
        if t.dtype != torch.int32:
            fail(name, f"must be int32, got {t.dtype}")
        if t.device != device:
            fail(name, f"on {t.device}, q is on {device}")
    num_seqs = seqused_k.numel()
    if seqused_k.dim() != 1:
        fail("seqused_k", f"expected [num_seqs], got shape {tuple(seqused_k.shape)}")
    if cu_seqlens_q.shape != (num_seqs + 1,):
        fail("cu_seqlens_q", f"shape {tuple(cu_seqlens_q.shape)}, expected [num_seqs + 1] = [{num_seqs + 1}]")
    if block_table.dim() != 2 or block_table.shape[0] != num_seqs:
        fail("block_table", f"shape {tuple(block_table.shape)}, expected [num_seqs={num_seqs}, max_blocks_per_seq]")
    if block_table.stride(1) != 1:
        fail("block_table", "rows must be contiguous")
    if len(window_size) != 2 or not all(int(w) >= -1 for w in window_size):
        fail("window_size", f"expected (left, right) with -1 for none, got {window_size}")
    if softcap < 0:
        fail("softcap", f"must be >= 0 (0: none), got {softcap}")
    strides = {}
    for name, scale, is_fp8 in (("q_descale", q_descale, q.dtype == FP8),
                                ("k_descale", k_descale, k.dtype == FP8),
                                ("v_descale", v_descale, k.dtype == FP8)):
        if not is_fp8:
            strides[name] = (0, 0)
            continue
        if scale is None:
            fail(name, "required: its tensor is FP8")
        strides[name] = _scale_strides(name, scale, num_seqs, num_kv_heads, device)
    return strides


def _validate_device_values(q, k, cu_seqlens_q, seqused_k, block_table, max_seqlen_q, max_seqlen_k):
    """Opt-in checks that read device values (they synchronize, twice): the harness turns them on."""
    lengths = torch.cat([cu_seqlens_q, seqused_k]).tolist()  # one transfer for both
    cu, used = lengths[:cu_seqlens_q.numel()], lengths[cu_seqlens_q.numel():]
    q_lens = [b - a for a, b in zip(cu, cu[1:])]
    if cu[0] != 0 or any(n < 0 for n in q_lens) or cu[-1] > q.shape[0]:
        raise ValueError(f"cu_seqlens_q: not a prefix sum within num_tokens={q.shape[0]}: {cu}")
    if any(kv < ql for kv, ql in zip(used, q_lens)):
        raise ValueError(f"seqused_k: some kv length is shorter than its query length ({used} vs {q_lens})")
    if max(q_lens, default=0) > max_seqlen_q or max(used, default=0) > max_seqlen_k:
        raise ValueError(f"max_seqlen_q/max_seqlen_k: smaller than the lengths given "
                         f"({max(q_lens)} > {max_seqlen_q} or {max(used)} > {max_seqlen_k})")
    num_blocks, block_size = k.shape[0], k.shape[1]
    need_blocks = [-(-kv // block_size) for kv in used]
    if max(need_blocks, default=0) > block_table.shape[1]:
        raise ValueError(f"block_table: {block_table.shape[1]} columns, a sequence needs {max(need_blocks)}")
    # Every entry a sequence uses, all rows at once: one transfer of the offending rows.
    need = torch.tensor(need_blocks, device=block_table.device)
    in_use = torch.arange(block_table.shape[1], device=block_table.device)[None, :] < need[:, None]
    outside = in_use & ((block_table < 0) | (block_table >= num_blocks))
    bad_rows = outside.any(dim=1).nonzero().flatten().tolist()
    if bad_rows:
        raise ValueError(f"block_table: sequence {bad_rows[0]} names a block outside [0, {num_blocks})")


# ----------------------------------------------------------------------------- launch configuration
@dataclass(frozen=True)
class LaunchConfig:
    """How one call is tiled and launched; `launch_config` picks it, callers may pass their own."""
    block_m: int        # query rows per program: block_m // queries_per_kv tokens x the heads of one kv head
    tile: int           # keys per tile-loop iteration
    num_segments: int   # 1: a program walks its whole kv range; > 1 (a power of two): split-KV
    num_warps: int
    num_stages: int
    max_registers: Optional[int] = None  # per thread (ptxas maxnreg): caps registers so more programs fit an SM
    v_as_words: bool = False  # FP8 cache: read V as 32-bit words, widen to float16 in registers
    q_as_f16: bool = False    # bf16 q, FP8 cache: Q.K^T in float16 (q scaled by a power of two)
    opaque_block_table: bool = False  # block numbers loaded out of the pipeliner's sight, so its stages
                                      # go to K and V alone (GPU only: the interpreter runs no asm)
    unmasked_tiles: bool = True  # tiles every row sees whole run in a loop of their own, without masks
    aligned_tiles: bool = False  # where tiles start on block boundaries, keys find their block and slot
                                 # from their place in the tile, not by dividing their position
    tma_decode: bool = False  # FP8-cache decode in _fp8_decode_kernel: one-warp programs, K and V by TMA
                              # (block_m: query-head rows, the MMA's N; tile: keys per TMA box)


# Measured on the H100 (scripts/tune_launch.py, results/h100/tuning*.json, RESULTS.md): decode
# streams best with 128-key tiles, 4 warps and 2 stages (64 x 4096 bf16: 0.96 of copy bandwidth);
# with an FP8 cache, 64-key tiles capped at 128 registers, so that 4 programs share an SM (64 x
# 4096 FP8 q: block 16 0.76 -> 0.78, block 64 0.74 -> 0.75; 1 x 32768 split in twice as many
# segments: 0.51 -> 0.53; more stages, warps or longer tiles were slower); a bf16 q computes Q.K^T in
# float16 wherever tiles have <= 64 rows (64 x 4096: 0.70 -> 0.76; 128-row prefill tiles slow
# down, 242 -> 217 TFLOP/s); an
# FP8 cache's prefill with 128-row tiles and 2 stages (4 x 4096, FP8 q: 1911 -> 1675 us; the bf16
# prefill keeps 64 x 64 tiles). Split-KV pays only where whole sequences leave SMs idle,
# and best near as many programs per SM as fit (bf16 1 x 32768: 2, 32 segments); each segment
# costs a partial-result write and its share of the reduction.
# On the H200 (scripts/tune_launch.py, results/h200/RESULTS.md), prefill-heavy batches with a
# 16-bit q load the block numbers out of the pipeliner's sight (opaque_block_table) at 2 stages:
# bf16 cache 1-5% faster on 4 shapes (4 x 4096: 2092 -> 2005 us), FP8 cache with a bf16 q 4-5%
# faster with blocks of 64 (3 shapes) but 3% slower with blocks of 16; an FP8 q lost 4-7%, mixed
# batches and decode gained nothing that held across dtypes, so they keep the visible load.
# Whole tiles in an unmasked loop of their own (unmasked_tiles), against one masked loop, in one
# run each (results/h200/RESULTS.md, "Unmasked whole tiles"): bf16 prefill 4 x 4096 2010 -> 1563
# us, mixed batches 6-11% and FP8-cache decode with blocks of 64 10% faster; an FP8 q's prefill
# spilled (58 -> 142 B) and slowed 1700 -> 2147 us at 4 warps but ran 1581 us at 8 (no spill);
# FP8-cache split-KV decode with blocks of 16 slowed 5% (39.4 -> 41.5 us), so it keeps one loop.
SPLIT_PROGRAMS_PER_SM = 2
MIN_TILES_PER_SEGMENT = 4
LONG_SEGMENT_TILES = 16
MAX_SEGMENTS = 128
# One-warp TMA decode (tma_decode), on the H200 (results/h200/probe_tdecode_*.json): 16-key tiles;
# about 1024 programs in all, where sequences x kv heads give fewer, by split-KV segments of
# at least 16 tiles: 64 x 4096 (512 programs) with 2 segments 149-155 us against 173-183 with 1 and
# 167-209 with 4; 256 x 1024 (2048 programs) unsplit 150-195 us, with 2 segments 170-172; one 32k
# sequence best with 128 segments (29.6 us; 64: 31.8, 256: 38.7). Two warps per program ran 4-20%
# slower on the 64 x 4096 rows (8-17% faster on 256 x 1024), four 10-42% slower.
# 6 stages (two K and two V boxes in flight, 14.4 KB of shared memory) against 8 (three, 18.5 KB),
# three runs each in one call (results/h200/probe_order.json): faster on 13 of 14 decode rows, by
# 1-3% on those >= 64 x 4096 (64 x 4096, blocks of 16, FP8 q: 0.811 -> 0.828 of copy bandwidth)
# and on one 32k sequence (0.52-0.54 -> 0.54-0.55), 3% on 256 x 1024; 4% slower on 512 x 512.
# Across 4-16 stages at each shape's default segments (probe_waves.json), 6 was the best or within
# 0.01 of it on 8 of 11 rows (not: 256 x 1024 with an FP8 q, 0.68-0.70 against 0.79 at 12 stages;
# 512 x 512, 0.77 against 0.80 at 8); 4 stages (one box in flight) ran 11-35% below the best, 16
# stages 13-30%.
TMA_DECODE_TILE = 16
TMA_DECODE_STAGES = 6
TMA_DECODE_PROGRAMS = 1024
TMA_DECODE_MIN_TILES_PER_SEGMENT = 16


@functools.lru_cache(maxsize=None)
def _num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the interpreter has no SMs; any fixed value keeps its choices deterministic


def _head_pad(head_size: int) -> int:
    """The head dim the kernel's tiles span: a power of two, at least 16 (tl.dot's smallest K)."""
    return max(16, triton.next_power_of_2(head_size))


def _floor_pow2(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def launch_config(*, max_seqlen_q, max_seqlen_k, num_tokens, num_seqs, num_kv_heads, queries_per_kv,
                  head_size, block_size, q_fp8, kv_fp8, device, split_kv=None, tma_readable=True) -> LaunchConfig:
    """The default tiling. split_kv: None decides by occupancy, True / False forces the path.
    tma_readable: the caches can be read by TMA (see _tma_readable); the interpreter reads them too."""
    decode_only = max_seqlen_q == 1
    head_pad = _head_pad(head_size)
    if (tma_readable and kv_fp8 and decode_only and head_pad <= 128 and queries_per_kv <= 16
            and block_size % TMA_DECODE_TILE == 0):
        return _tma_decode_config(max_seqlen_k=max_seqlen_k, programs=num_seqs * num_kv_heads,
                                  queries_per_kv=queries_per_kv, split_kv=split_kv)
    prefill_heavy = not decode_only and head_pad <= 128 and num_tokens >= 128 * num_seqs  # long queries
    block_m = 16 if decode_only else 64
    opaque_block_table = False
    if decode_only and head_pad <= 128:
        tile, num_warps, num_stages = 128, 4, 2
    elif kv_fp8 and prefill_heavy:
        block_m, tile, num_warps, num_stages = 128, 64, (8 if q_fp8 else 4), 2
        opaque_block_table = not q_fp8 and block_size > 16
    elif prefill_heavy:
        tile, num_warps, num_stages, opaque_block_table = 64, 4, 2, True
    else:
        tile, num_warps, num_stages = (32 if head_pad >= 256 else 64), 4, 3
    block_m = max(block_m, triton.next_power_of_2(queries_per_kv))
    fp8_decode = kv_fp8 and decode_only and head_pad <= 128 and block_m == 16
    max_registers, programs_per_sm = None, SPLIT_PROGRAMS_PER_SM
    if fp8_decode:
        tile, max_registers, programs_per_sm = 64, 128, 4  # 128 registers x 128 threads: 4 fit an SM
    # Decode programs are one per (sequence, kv head); when those cannot fill the SMs, long
    # sequences are cut into segments so that every SM streams as many as it holds.
    programs = num_seqs * num_kv_heads
    sms = _num_sms(device)
    if split_kv is None:
        split_kv = decode_only and programs < sms and max_seqlen_k >= 1024
    num_segments = 1
    tiles = triton.cdiv(max_seqlen_k, tile)  # of the longest sequence
    if split_kv:
        wanted = _floor_pow2(programs_per_sm * sms // programs)
        most = _floor_pow2(tiles // MIN_TILES_PER_SEGMENT)
        num_segments = max(2, min(wanted, most, MAX_SEGMENTS))
    # FP8-cache split-KV segments of at least LONG_SEGMENT_TILES tiles run the whole-sequence
    # decode's form (below: V as bytes or aligned tiles, block numbers out of sight, whole tiles
    # unmasked). On the H200, one sequence, FP8 and bf16 q, blocks of 16 and 64: 64k keys (16 tiles
    # a segment) 2-5% faster, 128k (32) 4-6% (blocks of 16, FP8 q: 124.4 -> 116.7 us; of 64: 119.2
    # -> 112.5), twice each against the previous default in one run (results/h200/probe_long_segments.json);
    # 16 x 4096 (4 segments of 16 tiles) 2-4% (probe_long_segments_batch.json); in an earlier run
    # 16k (4 tiles) 3-5% slower, 32k (8) 2% slower with blocks of 16 and 2-4% faster with blocks of
    # 64 (probe_split_decomposition.json). Other block sizes: not timed.
    long_segments = (fp8_decode and num_segments > 1 and block_size in (16, 64)
                     and triton.cdiv(tiles, num_segments) >= LONG_SEGMENT_TILES)  # as the kernel cuts them
    whole_form = fp8_decode and (num_segments == 1 or long_segments)
    # V of an FP8 cache is read as bytes or as 32-bit words widened in registers. Bytes run faster
    # with blocks of 16 (H100: 0.78 of copy bandwidth against 0.76) and, on the H200, of 64 (four
    # runs on four machines, 64 x 4096 FP8 q: 203.0-204.1 us against 205.2-206.4; on the H100 an
    # older kernel spilled 72-116 B there and words won); words in split-KV segments (1 x 32768:
    # 0.53 against 0.47). Block sizes not timed (32, 48, 128) keep words, the H100's choice.
    v_as_words = fp8_decode and (block_size not in (16, 64) or not whole_form)
    unmasked_tiles = not (fp8_decode and not whole_form and block_size <= 16)
    # Out of the pipeliner's sight, the block numbers make the FP8-cache decode 1-13% faster where
    # every program walks a whole sequence (64 x 4096, blocks of 16: 212 -> 185 us), not in split-KV
    # segments (1 x 32768: 39.4 -> 40.3-40.5 us); results/h200/sweep_fp8_decode_block_table.json.
    opaque_block_table = opaque_block_table or whole_form
    # A tile of exactly one block finds its keys' block and slots from the tile index (aligned_tiles).
    # Against dividing each key's position, on the H200 (results/h200/probe_aligned.json): prefill 4 x
    # 4096 with blocks of 64, bf16 1561 -> 1486 us, FP8 1578 -> 1535 us; the whole-sequence FP8-cache
    # decode with blocks of 64 then fits K and V double-buffered (3 stages, V as words) in 128
    # registers (483-487 loop instructions against 552, 16-24 B spilled against 88-108): 64 x 4096
    # 204.4 -> 197.0 us (FP8 q), 205.2 -> 199.7 (bf16 q), 64 x 8192 389.4 -> 377.0. With blocks of 16
    # (four per tile) the aligned form ran 4-17% slower at 2 stages and up to 10% slower double-
    # buffered, the mixed bf16 batch 8% slower, so they keep the division.
    # A bf16 q's prefill against an FP8 cache (128 x 64 tiles, 4 warps), on the H200 in one run of 16
    # tilings (results/h200/probe_bf16q_prefill.json): with blocks of 64, q in float16 and the block
    # divided per key, 4 x 4096 2035 -> 1817 us against 32-key tiles (1 x 8192 2099 -> 1817, 2 x 1024
    # 116.1 -> 107.2), aligned tiles 2059 us; with blocks of 16, the bf16 q 2106 -> 1903 us, in
    # float16 1957. 8 warps ran 2082-2989 us. (On the H100, q in float16 slowed 32-key tiles.)
    bf16_q_fp8_prefill = kv_fp8 and prefill_heavy and not q_fp8
    q_as_f16 = kv_fp8 and not q_fp8 and (block_m <= 64 or (bf16_q_fp8_prefill and block_size > 16))
    aligned_tiles = block_size == tile and (prefill_heavy or whole_form) and not bf16_q_fp8_prefill
    if aligned_tiles and fp8_decode:
        num_stages, v_as_words = 3, True
    return LaunchConfig(block_m=block_m, tile=tile, num_segments=num_segments,
                        num_warps=num_warps, num_stages=num_stages, max_registers=max_registers,
                        v_as_words=v_as_words, q_as_f16=q_as_f16,
                        opaque_block_table=opaque_block_table, unmasked_tiles=unmasked_tiles,
                        aligned_tiles=aligned_tiles)


def _tma_decode_config(*, max_seqlen_k, programs, queries_per_kv, split_kv) -> LaunchConfig:
    tiles = triton.cdiv(max_seqlen_k, TMA_DECODE_TILE)  # of the longest sequence
    most = _floor_pow2(tiles // TMA_DECODE_MIN_TILES_PER_SEGMENT)
    num_segments = min(_floor_pow2(max(1, TMA_DECODE_PROGRAMS // programs)), most, MAX_SEGMENTS)
    if split_kv is not None:
        num_segments = max(2, num_segments) if split_kv else 1
    return LaunchConfig(block_m=max(8, triton.next_power_of_2(queries_per_kv)), tile=TMA_DECODE_TILE,
                        num_segments=num_segments, num_warps=1, num_stages=TMA_DECODE_STAGES, tma_decode=True)


# ----------------------------------------------------------------------------- launcher
def _interpreting(device) -> bool:
    return device.type == "cpu" or os.environ.get("TRITON_INTERPRET") == "1"


def _v_words_readable(v, interpret) -> bool:
    """An FP8 V cache can be read as 32-bit words (four values each) when every row start is
    4-byte aligned; the interpreter runs no inline assembly, so it reads bytes."""
    return (v.dtype == FP8 and not interpret and v.data_ptr() % 4 == 0
            and all(stride % 4 == 0 for stride in v.stride()[:3]) and v.shape[3] % 4 == 0)


def _tma_readable(cache) -> bool:
    """TMA reads a tensor whose start and strides (but the last) are multiples of 16 bytes."""
    size = cache.element_size()
    return cache.data_ptr() % 16 == 0 and all(stride * size % 16 == 0 for stride in cache.stride()[:3])


def default_launch_config(q, k, v, seqused_k, max_seqlen_q, max_seqlen_k, split_kv=None) -> LaunchConfig:
    """The tiling unified_attention picks for these tensors when the caller gives no config."""
    num_tokens, num_q_heads, head_size = q.shape
    _, block_size, num_kv_heads, _ = k.shape
    return launch_config(max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, num_tokens=num_tokens,
                         num_seqs=seqused_k.numel(), num_kv_heads=num_kv_heads,
                         queries_per_kv=num_q_heads // num_kv_heads, head_size=head_size, block_size=block_size,
                         q_fp8=q.dtype == FP8, kv_fp8=k.dtype == FP8, device=q.device, split_kv=split_kv,
                         tma_readable=_tma_readable(k) and _tma_readable(v))


def attention_kernel(config: LaunchConfig):
    """The Triton kernel a launch with this configuration runs (before any split-KV reduction)."""
    return _fp8_decode_kernel if config.tma_decode else _unified_attention_kernel


def compile_options(q_dtype, kv_dtype, head_size, block_size, config: LaunchConfig, *, causal, use_window,
                    use_softcap, v_words_readable, interpret) -> dict:
    """The constexprs and launch options of attention_kernel(config) for one call: everything that
    picks a compiled variant (scripts/sass_report.py compiles the same variants without a GPU)."""
    kv_fp8 = kv_dtype == FP8
    head_pad = _head_pad(head_size)
    if config.tma_decode:
        return dict(HEAD_SIZE=head_size, HEAD_PAD=head_pad, BLOCK_SIZE=block_size, TILE=config.tile,
                    BLOCK_M=config.block_m, Q_FP8=q_dtype == FP8, Q_AS_F16=q_dtype == torch.bfloat16,
                    USE_WINDOW=use_window, USE_SOFTCAP=use_softcap, SPLIT_KV=config.num_segments > 1,
                    INTERPRET_SAFE=interpret, num_warps=config.num_warps, num_stages=config.num_stages)
    options = dict(
        HEAD_SIZE=head_size, HEAD_PAD=head_pad, BLOCK_SIZE=block_size, TILE=config.tile, BLOCK_M=config.block_m,
        Q_FP8=q_dtype == FP8, KV_FP8=kv_fp8,
        Q_AS_F16=config.q_as_f16 and kv_fp8 and q_dtype == torch.bfloat16,
        V_WORDS=config.v_as_words and v_words_readable,
        PV_DTYPE=tl.float16 if kv_fp8 else (tl.bfloat16 if kv_dtype == torch.bfloat16 else tl.float16),
        FP8_PROMOTE_K=min(32, head_pad),
        CAUSAL=causal, USE_WINDOW=use_window, USE_SOFTCAP=use_softcap,
        SPLIT_KV=config.num_segments > 1, OPAQUE_BT=config.opaque_block_table and not interpret,
        UNMASKED_TILES=config.unmasked_tiles, ALIGNED_TILES=config.aligned_tiles and config.tile % block_size == 0,
        INTERPRET_SAFE=interpret, num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if config.max_registers and not interpret:
        options["maxnreg"] = config.max_registers
    return options


def unified_attention(
    q, k, v, out, cu_seqlens_q, seqused_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
    window_size, block_table, softcap, q_descale, k_descale, v_descale,
    alibi_slopes=None, sinks=None, *, split_kv=None, config=None, validate=False,
):
    """Paged attention over a batch mixing decode, chunked prefill and prefill; writes `out`.

    split_kv: None picks the launch path (split-KV for decode batches too small to fill the GPU),
    True / False forces the split-KV ("3d") / whole-sequence ("2d") path.
    config: a LaunchConfig overriding the default tiling (for tuning); split_kv is then unused.
    validate: also check device values (block table range and length); synchronizes.
    """
    if alibi_slopes is not None:
        raise ValueError("alibi_slopes: not supported by this kernel")
    if sinks is not None:
        raise ValueError("sinks: not supported by this kernel")
    strides = _check_arguments(q, k, v, out, cu_seqlens_q, seqused_k, block_table, window_size,
                               float(softcap), q_descale, k_descale, v_descale)
    if validate:
        _validate_device_values(q, k, cu_seqlens_q, seqused_k, block_table, max_seqlen_q, max_seqlen_k)

    num_tokens, num_q_heads, head_size = q.shape
    _, block_size, num_kv_heads, _ = k.shape
    num_seqs = seqused_k.numel()
    if num_tokens == 0 or num_seqs == 0:
        return out
    queries_per_kv = num_q_heads // num_kv_heads
    q_fp8, kv_fp8 = q.dtype == FP8, k.dtype == FP8
    interpret = _interpreting(q.device)
    if config is None:
        config = default_launch_config(q, k, v, seqused_k, max_seqlen_q, max_seqlen_k, split_kv)
    elif config.tma_decode:  # a caller's configuration: launch_config's conditions, checked here
        if not (kv_fp8 and max_seqlen_q == 1 and block_size % config.tile == 0):
            raise ValueError(f"config.tma_decode: for decode (max_seqlen_q 1) against an FP8 cache whose block size "
                             f"is a multiple of config.tile={config.tile}")
        if not (_tma_readable(k) and _tma_readable(v)):
            raise ValueError("config.tma_decode: k and v must start and stride in multiples of 16 bytes")
    num_segments = config.num_segments
    if num_segments < 1 or num_segments & (num_segments - 1):
        raise ValueError(f"config.num_segments: must be a power of two, got {num_segments}")
    if config.block_m < queries_per_kv or config.block_m & (config.block_m - 1):
        raise ValueError(f"config.block_m: must be a power of two >= queries_per_kv={queries_per_kv}, "
                         f"got {config.block_m}")

    # M packs block_q tokens x the query heads of one kv head.
    block_q = config.block_m // queries_per_kv
    head_pad = _head_pad(head_size)
    num_q_blocks = num_tokens // block_q + num_seqs  # upper bound; surplus programs exit at once

    left, right = (int(w) for w in window_size)
    use_window = left >= 0 or (right >= 0 and not causal)
    left = left if left >= 0 else NO_WINDOW
    right = right if right >= 0 else NO_WINDOW

    if num_segments > 1:
        rows = num_tokens * num_q_heads * num_segments
        partials = torch.empty(rows * (head_pad + 2), dtype=torch.float32, device=q.device)  # one allocation
        seg_acc, seg_max, seg_sum = partials.split([rows * head_pad, rows, rows])
    else:
        seg_acc = seg_max = seg_sum = out  # unused: the whole-sequence path never touches them
    dummy = cu_seqlens_q  # stands in for scales a branch never loads
    qs = q_descale if q_fp8 else dummy
    ks = k_descale if kv_fp8 else dummy
    vs = v_descale if kv_fp8 else dummy

    options = compile_options(q.dtype, k.dtype, head_size, block_size, config, causal=bool(causal),
                              use_window=use_window, use_softcap=float(softcap) > 0,
                              v_words_readable=_v_words_readable(v, interpret), interpret=interpret)
    if config.tma_decode:
        box = [1, config.tile, 1, head_pad]
        _fp8_decode_kernel[(num_seqs, num_kv_heads, num_segments)](
            out, seg_acc, seg_max, seg_sum,                                  #
            q, TensorDescriptor.from_tensor(k, box), TensorDescriptor.from_tensor(v, box),
            block_table, seqused_k, cu_seqlens_q,                            #
            qs, ks, vs,                                                      #
            *strides["q_descale"], *strides["k_descale"],                    #
            *strides["v_descale"],                                           #
            float(softmax_scale), float(softcap), left,                      #
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),          #
            block_table.stride(0),                                           #
            num_q_heads, queries_per_kv, num_segments,                       #
            **options,
        )
    else:
        _unified_attention_kernel[(num_q_blocks, num_kv_heads, num_segments)](
            out, seg_acc, seg_max, seg_sum,                                  #
            q, k, v,                                                         #
            block_table, seqused_k, cu_seqlens_q, num_seqs,                  #
            qs, ks, vs,                                                      #
            *strides["q_descale"], *strides["k_descale"],                    #
            *strides["v_descale"],                                           #
            float(softmax_scale), float(softcap), left, right,               #
            q.stride(0), q.stride(1),                                        #
            out.stride(0), out.stride(1),                                    #
            k.stride(0), k.stride(1), k.stride(2),                           #
            v.stride(0), v.stride(1), v.stride(2),                           #
            block_table.stride(0),                                           #
            num_q_heads, queries_per_kv, block_q, num_segments,              #
            **options,
        )
    if num_segments > 1:
        _reduce_segments_kernel[(num_tokens, num_q_heads)](
            out, seg_acc, seg_max, seg_sum, cu_seqlens_q, num_seqs,          #
            out.stride(0), out.stride(1), num_q_heads,                       #
            HEAD_SIZE=head_size, HEAD_PAD=head_pad, NUM_SEGMENTS=num_segments,
            INTERPRET_SAFE=interpret,                                        #
        )
    return out
