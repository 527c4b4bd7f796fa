"""Seeded inputs for one case: high-precision tensors, their quantized forms, and the kernel's keyword arguments.

Every value a correct kernel reads (queries, the used cache slots, scales, block table) comes from
the case's seed through integer arithmetic that is exact on every device (a counter-based hash,
drawn where the tensors live, so a GPU run does not wait on the CPU), so the same seed gives
the same inputs bit for bit on any device. Cache slots no sequence owns hold device-drawn noise:
a kernel that reads them is wrong on any device.
The block table is a random permutation over more blocks than needed, so a layout bug cannot
hide behind tidy, sequential pages.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from harness.schema import Case
from reference import LowPrecision, count_saturated, quantize

TORCH_DTYPES = {"fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16, "fp16": torch.float16}
# Input spread: scores q.k/sqrt(d) get a standard deviation of about 2.25, peaked enough that a
# dropped scale moves the softmax far, and inside FP8's range for scales down to ~0.01.
QK_STD = 1.5
V_STD = 1.0
# layout=strided: cache head rows this many elements longer than head_size (8 FP8 bytes: no 16-byte multiple)
CACHE_ROW_PAD = 8
# Triton's JIT (its caches, compilation) is not thread-safe: one launch at a time in a process
# that judges cases on several threads (harness.runner), here and for the kernel under test.
TRITON_LOCK = threading.Lock()


@dataclass
class AttentionInputs:
    case: Case
    kernel_kwargs: dict          # vLLM unified_attention keywords, `out` poisoned with NaN
    ref_kwargs: dict             # what the quantization-aware reference takes (the kernel's inputs)
    e2e_kwargs: dict             # the same attention on the unquantized float32 tensors
    lowp: LowPrecision           # where a plain low-precision implementation rounds, as the kernel does
    saturated: dict              # {"q": n, "k": n, "v": n} elements a kernel reads that were clamped to +-448

    def fresh_out(self) -> torch.Tensor:
        """Poison the output with NaN so that unwritten elements show."""
        out = self.kernel_kwargs["out"]
        out.fill_(float("nan"))
        return out


_MASK32 = 0xFFFFFFFF
# Irwin-Hall of four 12-bit uniforms has variance 4 * (4096**2 - 1) / 12; its square root is ~2364.8.
_NORMAL_STEP = 1.0 / 2364.8


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply), a bijection; int64 keeps products from overflowing."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    return (x >> 16) ^ x


def _counter_keys(seed: int, stream: int) -> tuple:
    # _mix32 on python ints: the same bits as on int64 tensors (every product stays below 2^59).
    return (_mix32((seed * 7919 + stream * 2 + 1) & _MASK32), _mix32((seed * 7919 + stream * 2 + 2) & _MASK32))


def _counter_normal_torch(n: int, key0: int, key1: int, device) -> torch.Tensor:
    idx = torch.arange(n, device=device, dtype=torch.int64)
    h1 = _mix32((idx ^ key0) & _MASK32)
    h2 = _mix32((idx ^ key1) & _MASK32)
    total = (h1 & 0xFFF) + ((h1 >> 12) & 0xFFF) + (h2 & 0xFFF) + ((h2 >> 12) & 0xFFF)
    return (total - 8190).to(torch.float32) * _NORMAL_STEP


@triton.jit
def _mix32_tl(x):
    x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    return (x >> 16) ^ x


@triton.jit
def _counter_normal_kernel(out_ptr, n, key0, key1, step, BLOCK: tl.constexpr):
    # The same integer steps as _counter_normal_torch, in int64 registers: one write per element
    # instead of some thirty int64 tensors through memory.
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    h1 = _mix32_tl((idx ^ key0.to(tl.int64)) & 0xFFFFFFFF)
    h2 = _mix32_tl((idx ^ key1.to(tl.int64)) & 0xFFFFFFFF)
    total = (h1 & 0xFFF) + ((h1 >> 12) & 0xFFF) + (h2 & 0xFFF) + ((h2 >> 12) & 0xFFF)
    tl.store(out_ptr + idx, (total - 8190).to(tl.float32) * step, mask=idx < n)


def counter_normal(shape, seed: int, stream: int, device, use_triton=None) -> torch.Tensor:
    """Standard-normal-like float32 values, identical bits on any device for the same (seed, stream).

    Each element sums four 12-bit uniform integers hashed from its index (Irwin-Hall: mean 0,
    variance 1, tails bounded at +-3.46); the only float operation is one correctly rounded multiply.
    On a GPU one Triton kernel computes it (tests hold it bitwise equal to the torch steps).
    """
    n = math.prod(shape)
    key0, key1 = _counter_keys(seed, stream)
    device = torch.device(device)
    if use_triton is None:
        use_triton = device.type == "cuda"
    if not use_triton:
        return _counter_normal_torch(n, key0, key1, device).view(shape)
    out = torch.empty(n, device=device, dtype=torch.float32)
    block = 1024
    with TRITON_LOCK:
        _counter_normal_kernel[(triton.cdiv(n, block),)](out, n, key0, key1, _NORMAL_STEP, BLOCK=block)
    return out.view(shape)


def _scale_table(base: float, layout: str, num_seqs: int, num_kv_heads: int, gen) -> torch.Tensor:
    """Per-(sequence, kv head) scales: one value, or the base spread over [0.5x, 2x] by the seed."""
    if layout == "tensor":
        return torch.full((num_seqs, num_kv_heads), base)
    return base * torch.exp2(torch.rand(num_seqs, num_kv_heads, generator=gen) * 2 - 1)


def _quantize_as(x: torch.Tensor, dtype_name: str, scale_per_row: torch.Tensor, rows_read=None):
    """(kernel tensor, saturated count as a 0-d tensor, read later with the others in one transfer):
    FP8 through reference.quantize, else a plain cast. rows_read (bool per row): only these rows
    count, the ones a kernel reads (a sequence's last block has unused tail slots)."""
    if dtype_name != "fp8":
        return x.to(TORCH_DTYPES[dtype_name]), torch.zeros((), dtype=torch.int64, device=x.device)
    read = x if rows_read is None else x * rows_read.view(-1, *[1] * (x.dim() - 1))  # zeros never saturate
    return quantize(x, scale_per_row), count_saturated(read, scale_per_row, as_tensor=True)


def _rows_of(lengths, device) -> torch.Tensor:
    """[sum(lengths)] index of the sequence each row belongs to, built on `device` (only the lengths travel)."""
    repeats = torch.tensor(lengths, device=device)
    return torch.repeat_interleave(torch.arange(len(lengths), device=device), repeats, output_size=sum(lengths))


def _descale_arg(table: torch.Tensor, layout: str, device) -> torch.Tensor:
    return (table[:1, :1].reshape(1) if layout == "tensor" else table).to(device=device, dtype=torch.float32)


def e2e_key(case: Case) -> tuple:
    """The case fields that determine e2e_kwargs (the unquantized attention): cases equal here, which
    differ only in dtypes, scales, launch path or cache size, have bitwise equal e2e references."""
    return (case.seed, tuple(case.seq_lens), tuple(case.heads), case.head_size, case.block_size,
            case.layout, case.causal, case.window, case.softcap)


def build_inputs(case: Case, device="cpu") -> AttentionInputs:
    gen = torch.Generator().manual_seed(case.seed)
    device = torch.device(device)
    num_q_heads, num_kv_heads = case.heads
    d, bs = case.head_size, case.block_size
    q_lens = [ql for ql, _ in case.seq_lens]
    kv_lens = [kl for _, kl in case.seq_lens]
    num_seqs, num_tokens = len(q_lens), sum(q_lens)
    group = num_q_heads // num_kv_heads
    q_scale, k_scale, v_scale = case.scales

    # -- scales and quantized queries --
    qs = _scale_table(q_scale, case.scale_layout, num_seqs, num_kv_heads, gen)
    ks = _scale_table(k_scale, case.scale_layout, num_seqs, num_kv_heads, gen)
    vs = _scale_table(v_scale, case.scale_layout, num_seqs, num_kv_heads, gen)
    q_hp = counter_normal((num_tokens, num_q_heads, d), case.seed, 0, device) * QK_STD
    q_row_scale = qs.to(device)[_rows_of(q_lens, device)].repeat_interleave(group, dim=1)[..., None]  # [T, Hq, 1]
    q_k, sat_q = _quantize_as(q_hp, case.q_dtype, q_row_scale)

    # -- paged cache: sequence s owns blocks_needed[s] blocks at random physical places --
    blocks_needed = [math.ceil(kl / bs) for kl in kv_lens]
    if sum(blocks_needed) > case.num_blocks:
        raise ValueError(f"num_blocks {case.num_blocks} < {sum(blocks_needed)} blocks the sequences need")
    perm = torch.randperm(case.num_blocks, generator=gen)
    # Spare columns hold unused entries, as real tables do; exact_table has none, so that a read
    # past a sequence's blocks in the last row leaves the tensor (verify --memcheck reports it).
    width = max(blocks_needed) + (0 if case.layout == "exact_table" else 3)
    block_table = torch.randint(0, case.num_blocks, (num_seqs, width), generator=gen, dtype=torch.int32)
    owned = torch.split(perm[:sum(blocks_needed)], blocks_needed)
    for s, blocks in enumerate(owned):
        block_table[s, :len(blocks)] = blocks.to(torch.int32)

    logical_shape = (sum(blocks_needed) * bs, num_kv_heads, d)
    k_logical = counter_normal(logical_shape, case.seed, 1, device) * QK_STD
    v_logical = counter_normal(logical_shape, case.seed, 2, device) * V_STD
    first_block = [sum(blocks_needed[:s]) for s in range(num_seqs)]  # each sequence's first logical block
    if case.layout == "shared_blocks":
        # As prefix caching does: sequences whose cached context fills their first block read one
        # physical block holding the same tokens; the blocks they gave up stay in the cache, unused.
        sharers = [s for s in range(num_seqs) if kv_lens[s] - q_lens[s] >= bs]
        for s in sharers[1:]:
            src, dst = first_block[sharers[0]] * bs, first_block[s] * bs
            k_logical[dst:dst + bs] = k_logical[src:src + bs]
            v_logical[dst:dst + bs] = v_logical[src:src + bs]
            block_table[s, 0] = block_table[sharers[0], 0]
    seq_of_slot = _rows_of([n * bs for n in blocks_needed], device)
    slot_in_seq = torch.arange(len(seq_of_slot), device=device) - \
        torch.tensor(first_block, device=device)[seq_of_slot] * bs
    slot_read = slot_in_seq < torch.tensor(kv_lens, device=device)[seq_of_slot]
    k_q, sat_k = _quantize_as(k_logical, case.kv_dtype, ks.to(device)[seq_of_slot][..., None], slot_read)
    v_q, sat_v = _quantize_as(v_logical, case.kv_dtype, vs.to(device)[seq_of_slot][..., None], slot_read)

    kv_dtype = TORCH_DTYPES[case.kv_dtype]
    slots = perm[:sum(blocks_needed)].to(device)
    dev_gen = torch.Generator(device=device).manual_seed(case.seed + 1)

    def paged(logical_q, std):
        """The kernel's cache: the sequences' blocks at their slots, noise everywhere else."""
        noise_dtype = torch.float16 if case.kv_dtype == "fp8" else kv_dtype
        noise = torch.randn((case.num_blocks, bs, num_kv_heads, d), generator=dev_gen, device=device,
                            dtype=noise_dtype) * std
        cache = noise.to(kv_dtype)
        cache[slots] = logical_q.view(-1, bs, num_kv_heads, d)
        if case.layout == "strided":
            # Head rows CACHE_ROW_PAD elements apart beyond head_size: strides TMA cannot read (it
            # needs 16-byte multiples), so an FP8 cache's decode takes the 4-warp kernel.
            wide = torch.zeros((case.num_blocks, bs, num_kv_heads, d + CACHE_ROW_PAD), dtype=kv_dtype, device=device)
            wide[..., :d] = cache
            cache = wide[..., :d]
        return cache

    k_cache = paged(k_q, QK_STD)
    v_cache = paged(v_q, V_STD)
    # The unquantized reference reads a compact cache holding only the sequences' blocks, in
    # order, through a block table renumbered to match: the same attention, a fraction of the memory.
    compact_table = torch.zeros(num_seqs, width, dtype=torch.int32)
    for s, n in enumerate(blocks_needed):
        compact_table[s, :n] = torch.arange(first_block[s], first_block[s] + n, dtype=torch.int32)
    k_hp = k_logical.view(-1, bs, num_kv_heads, d)
    v_hp = v_logical.view(-1, bs, num_kv_heads, d)

    # -- queries and output, optionally as non-contiguous views --
    q_dtype, out_dtype = TORCH_DTYPES[case.q_dtype], TORCH_DTYPES[case.out_dtype]
    if case.layout == "strided":
        q_dev = torch.empty(num_q_heads, num_tokens, d, dtype=q_dtype, device=device).transpose(0, 1)
        q_dev.copy_(q_k)
        out = torch.empty(num_tokens, num_q_heads, 2 * d, dtype=out_dtype, device=device)[..., :d]
        block_table = torch.cat([block_table, block_table], dim=1)[:, :width]  # row stride 2x width
    else:
        q_dev = q_k
        out = torch.empty(num_tokens, num_q_heads, d, dtype=out_dtype, device=device)
    out.fill_(float("nan"))

    cu_seqlens_q = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
    common = dict(
        cu_seqlens_q=cu_seqlens_q,
        seqused_k=torch.tensor(kv_lens, dtype=torch.int32, device=device),
        block_table=block_table.to(device),
        softmax_scale=d ** -0.5,
        causal=case.causal,
        window_size=(case.window - 1, 0 if case.causal else case.window - 1) if case.window > 0 else (-1, -1),
        softcap=float(case.softcap),
    )
    descales = dict(
        q_descale=_descale_arg(qs, case.scale_layout, device) if case.q_dtype == "fp8" else None,
        k_descale=_descale_arg(ks, case.scale_layout, device) if case.kv_dtype == "fp8" else None,
        v_descale=_descale_arg(vs, case.scale_layout, device) if case.kv_dtype == "fp8" else None,
    )
    kernel_kwargs = dict(q=q_dev, k=k_cache, v=v_cache, out=out, max_seqlen_q=max(q_lens),
                         max_seqlen_k=max(kv_lens), **common, **descales)
    ref_kwargs = dict(q=q_dev, k_cache=k_cache, v_cache=v_cache, **common, **descales)
    e2e_kwargs = dict(q=q_hp, k_cache=k_hp, v_cache=v_hp,
                      **dict(common, block_table=compact_table.to(device)))
    p_dtype = torch.float16 if case.kv_dtype == "fp8" else kv_dtype
    return AttentionInputs(
        case=case, kernel_kwargs=kernel_kwargs, ref_kwargs=ref_kwargs, e2e_kwargs=e2e_kwargs,
        lowp=LowPrecision(qk_dtype=None, p_dtype=p_dtype, out_dtype=out_dtype),
        saturated=dict(zip("qkv", torch.stack([sat_q, sat_k, sat_v]).tolist())),
    )
