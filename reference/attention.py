"""Float32/float64 reference for paged attention with FP8 inputs (vLLM unified_attention layouts).

Layouts
  q            [num_tokens, num_q_heads, head_size]
  k/v_cache    [num_blocks, block_size, num_kv_heads, head_size]
  block_table  int32 [num_seqs, max_blocks_per_seq]
  cu_seqlens_q int32 [num_seqs + 1]
  seqused_k    int32 [num_seqs]   total kv length (context + new tokens)

Query token i of sequence s (query_len = cu[s+1] - cu[s]) sits at absolute position
seqused_k[s] - query_len + i; key j of s is visible to it iff j < seqused_k[s] and the
causal / sliding-window conditions hold.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from .quant import expand_scale, is_fp8

# Upper bound on the padded score tensor of one work item (elements). Sequences are grouped
# under it, and a sequence too big on its own is split into query chunks.
MAX_SCORE_ELEMENTS = 2 ** 28
# A group's padded scores may be at most this many times its sequences' real scores...
PAD_WASTE = 2
# ...unless the group is this small (elements), where one more launch costs more than the padding.
SMALL_GROUP = 2 ** 25


class LowPrecision(NamedTuple):
    """Where a plain low-precision kernel rounds; None means no rounding at that point.

    qk_dtype:  dequantized q and k are rounded to it before the score product.
    p_dtype:   softmax numerator p is rounded to it before the P.V product
               (the denominator uses the unrounded p).
    out_dtype: the normalized output is rounded to it.
    """
    qk_dtype: Optional[torch.dtype] = None
    p_dtype: Optional[torch.dtype] = None
    out_dtype: Optional[torch.dtype] = None


class _Work(NamedTuple):
    seqs: List[int]   # sequences processed together
    q_start: int      # first query row (within each sequence)
    q_rows: int       # padded number of query rows
    k_lo: int         # key positions [k_lo, k_hi)
    k_hi: int


def _round(x: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    return x if dtype is None else x.to(dtype).to(x.dtype)


def _to_device(x: torch.Tensor, device) -> torch.Tensor:
    """A small CPU tensor on `device` without waiting for the work queued there (pinned, async)."""
    if torch.device(device).type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def _tf32_matmul_enabled() -> bool:
    # Both the legacy flag and the newer fp32_precision knob may be in use; reading the
    # "wrong" one can raise, so each read is guarded.
    try:
        if getattr(torch.backends.cuda.matmul, "fp32_precision", None) == "tf32":
            return True
    except Exception:
        pass
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    except Exception:
        return False


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # A reference must not silently run float32 products in TF32; when the process has TF32
    # on, do the product in float64 instead of touching global settings.
    if a.is_cuda and a.dtype == torch.float32 and _tf32_matmul_enabled():
        return (a.double() @ b.double()).to(a.dtype)
    return a @ b


def _key_range(qpos_first: int, qpos_last: int, kv_len: int, causal: bool,
               window_size: Tuple[int, int]) -> Tuple[int, int]:
    """Smallest key range [lo, hi) that covers what queries qpos_first..qpos_last can see."""
    left, right = window_size
    hi = kv_len
    if causal:
        hi = min(hi, qpos_last + 1)
    if right >= 0:
        hi = min(hi, qpos_last + right + 1)
    lo = max(0, qpos_first - left) if left >= 0 else 0
    return lo, max(lo, hi)


def _plan(q_lens: List[int], kv_lens: List[int], num_q_heads: int, budget: int,
          causal: bool, window_size: Tuple[int, int]) -> List[_Work]:
    """Work items: sequences of similar shape padded into one batch, long ones split into query chunks.

    Sequences are taken longest query first, and a group grows while its padded score tensor stays
    under the budget and within PAD_WASTE times the scores its sequences really have (or under
    SMALL_GROUP elements, where launches cost more than padding): a 256-token chunk batched with
    decodes of 4000 keys would otherwise pad every decode to 256 x 4000 rows of scores.
    """
    work: List[_Work] = []
    group: List[int] = []
    gq = gk = real = 0

    def flush():
        nonlocal group, gq, gk, real
        if group:
            work.append(_Work(group, 0, gq, 0, gk))
        group, gq, gk, real = [], 0, 0, 0

    order = sorted(range(len(q_lens)), key=lambda s: (-q_lens[s], -kv_lens[s], s))
    for s in order:
        ql, kl = q_lens[s], kv_lens[s]
        if ql == 0:
            continue
        if ql * kl * num_q_heads > budget:
            flush()
            rows = max(1, budget // max(1, kl * num_q_heads))
            for start in range(0, ql, rows):
                n = min(rows, ql - start)
                first = kl - ql + start
                lo, hi = _key_range(first, first + n - 1, kl, causal, window_size)
                work.append(_Work([s], start, n, lo, hi))
            continue
        nq, nk = max(gq, ql), max(gk, kl)
        padded = (len(group) + 1) * nq * nk * num_q_heads
        grown_real = real + ql * kl * num_q_heads
        if group and (padded > budget or padded > max(PAD_WASTE * grown_real, SMALL_GROUP)):
            flush()
            nq, nk, grown_real = ql, kl, ql * kl * num_q_heads
        group.append(s)
        gq, gk, real = nq, nk, grown_real
    flush()
    return work


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
                        lowp: Optional[LowPrecision] = None, out_dtype: Optional[torch.dtype] = None,
                        **kwargs) -> torch.Tensor:
    """Attention output [num_tokens, num_q_heads, head_size] in compute_dtype on q's device.

    FP8 inputs are dequantized with their descale (None, one element, or [num_seqs, num_kv_heads]);
    descales of non-FP8 inputs are ignored. window_size = (left, right), -1 meaning unbounded.
    `lowp` simulates a low-precision kernel's roundings; `out_dtype` (used when lowp gives none)
    rounds the final result. Rows of tokens past cu_seqlens_q[-1] are zero.
    Keywords: those of paged_attention_refs.
    """
    return paged_attention_refs(q, k_cache, v_cache, roundings=[lowp], out_dtype=out_dtype, **kwargs)[0]


def paged_attention_refs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    cu_seqlens_q: torch.Tensor,
    seqused_k: torch.Tensor,
    block_table: torch.Tensor,
    softmax_scale: float,
    causal: bool = True,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    q_descale: Optional[torch.Tensor] = None,
    k_descale: Optional[torch.Tensor] = None,
    v_descale: Optional[torch.Tensor] = None,
    compute_dtype: torch.dtype = torch.float32,
    roundings: Sequence[Optional[LowPrecision]] = (None,),
    out_dtype: Optional[torch.dtype] = None,
    max_score_elements: Optional[int] = None,
) -> List[torch.Tensor]:
    """paged_attention_ref's output once per entry of `roundings` (None: no rounding), computed in
    one pass: the gathers, scores and softmax are shared, so the entries must agree on qk_dtype."""
    if compute_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"compute_dtype must be float32 or float64, got {compute_dtype}")
    device = q.device
    cd = compute_dtype
    num_tokens, num_q_heads, head_size = q.shape
    num_blocks, block_size, num_kv_heads, kv_head_size = k_cache.shape
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    if kv_head_size != head_size:
        raise ValueError(f"q head_size {head_size} != cache head_size {kv_head_size}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads {num_q_heads} not a multiple of num_kv_heads {num_kv_heads}")
    rep = num_q_heads // num_kv_heads
    left, right = int(window_size[0]), int(window_size[1])
    window_size = (left, right)

    cu = [int(x) for x in cu_seqlens_q.tolist()]
    kv_lens = [int(x) for x in seqused_k.tolist()]
    num_seqs = len(cu) - 1
    q_lens = [cu[s + 1] - cu[s] for s in range(num_seqs)]
    if len(kv_lens) != num_seqs or block_table.shape[0] != num_seqs:
        raise ValueError("cu_seqlens_q, seqused_k and block_table disagree on num_seqs")
    if cu[-1] > num_tokens:
        raise ValueError(f"cu_seqlens_q[-1]={cu[-1]} > num_tokens={num_tokens}")
    max_blocks = block_table.shape[1]
    for s in range(num_seqs):
        if q_lens[s] < 0 or kv_lens[s] < q_lens[s]:
            raise ValueError(f"seq {s}: query_len {q_lens[s]} > seqused_k {kv_lens[s]} or negative")
        if -(-kv_lens[s] // block_size) > max_blocks:
            raise ValueError(f"seq {s}: seqused_k {kv_lens[s]} needs more than {max_blocks} blocks")

    # Per-(seq, kv head) descales; 1.0 for non-fp8 tensors.
    def descale(x, d):
        return expand_scale(d if is_fp8(x) else None, num_seqs, num_kv_heads, device=device, dtype=cd)
    qs = descale(q, q_descale).repeat_interleave(rep, dim=1)       # [S, Hq]
    ks = descale(k_cache, k_descale)                                # [S, Hkv]
    vs = descale(v_cache, v_descale)

    roundings = [r if r is not None else LowPrecision() for r in roundings]
    if len({r.qk_dtype for r in roundings}) != 1:
        raise ValueError("roundings computed in one pass must share qk_dtype")
    qk_dtype = roundings[0].qk_dtype

    cu_t = _to_device(torch.tensor(cu, dtype=torch.long), device)
    kv_t = _to_device(torch.tensor(kv_lens, dtype=torch.long), device)
    ql_t = cu_t.diff()
    bt = block_table.to(device=device, dtype=torch.long)

    # One spare row past the last token takes the padded rows of every work item, so that results
    # scatter by index without a boolean mask (which would wait for the device on every item).
    outs = [torch.zeros(num_tokens + 1, num_q_heads, head_size, dtype=cd, device=device) for _ in roundings]
    budget = MAX_SCORE_ELEMENTS if max_score_elements is None else int(max_score_elements)

    for w in _plan(q_lens, kv_lens, num_q_heads, budget, causal, window_size):
        if w.k_hi <= w.k_lo:
            continue  # nothing visible: rows stay zero
        G, Lq, Lk = len(w.seqs), w.q_rows, w.k_hi - w.k_lo
        sidx = _to_device(torch.tensor(w.seqs, dtype=torch.long), device)
        qlen, kvlen = ql_t[sidx], kv_t[sidx]

        # Queries: padded rows point at token 0 and are masked out.
        qi = w.q_start + torch.arange(Lq, device=device)                      # [Lq]
        qvalid = qi[None, :] < qlen[:, None]                                   # [G, Lq]
        tok = torch.where(qvalid, cu_t[sidx][:, None] + qi[None, :], 0)
        qpos = kvlen[:, None] - qlen[:, None] + qi[None, :]                    # [G, Lq]

        # Keys: gather through the block table; padded positions point at block 0 and are masked.
        kpos = w.k_lo + torch.arange(Lk, device=device)                        # [Lk]
        kvalid = kpos[None, :] < kvlen[:, None]                                # [G, Lk]
        col = (kpos // block_size).clamp_max(max_blocks - 1)
        blk = torch.where(kvalid, bt[sidx][:, col], 0)                         # [G, Lk]
        off = (kpos % block_size)[None, :].expand(G, Lk)

        qg = q[tok].to(cd) * qs[sidx][:, None, :, None]                        # [G, Lq, Hq, D]
        kg = k_cache[blk, off].to(cd) * ks[sidx][:, None, :, None]             # [G, Lk, Hkv, D]
        vg = v_cache[blk, off].to(cd) * vs[sidx][:, None, :, None]
        qg, kg = _round(qg, qk_dtype), _round(kg, qk_dtype)

        # [G, Hkv, rep*Lq, D] @ [G, Hkv, D, Lk]
        qh = qg.view(G, Lq, num_kv_heads, rep, head_size).permute(0, 2, 3, 1, 4)
        qh = qh.reshape(G, num_kv_heads, rep * Lq, head_size)
        S = _matmul(qh, kg.permute(0, 2, 3, 1)).view(G, num_kv_heads, rep, Lq, Lk)
        S.mul_(softmax_scale)
        if softcap > 0:
            S.div_(softcap).tanh_().mul_(softcap)

        vis = kvalid[:, None, :] & qvalid[:, :, None]                          # [G, Lq, Lk]
        if causal:
            vis &= kpos[None, None, :] <= qpos[:, :, None]
        if left >= 0:
            vis &= kpos[None, None, :] >= qpos[:, :, None] - left
        if right >= 0:
            vis &= kpos[None, None, :] <= qpos[:, :, None] + right
        S.masked_fill_(~vis[:, None, None], float("-inf"))

        m = S.amax(dim=-1, keepdim=True)
        m.masked_fill_(m == float("-inf"), 0.0)   # fully masked row: p = 0 everywhere, not NaN
        p = S.sub_(m).exp_()
        l = p.sum(dim=-1, keepdim=True)
        l = torch.where(l > 0, l, torch.ones_like(l))
        rows = torch.where(qvalid, tok, num_tokens).flatten()
        for r, out in zip(roundings, outs):
            o = _matmul(_round(p, r.p_dtype).view(G, num_kv_heads, rep * Lq, Lk), vg.permute(0, 2, 1, 3))
            o = o.view(G, num_kv_heads, rep, Lq, head_size) / l
            out.index_copy_(0, rows, o.permute(0, 3, 1, 2, 4).reshape(G * Lq, num_q_heads, head_size))
        del S, p, vis

    return [_round(out[:num_tokens], r.out_dtype if r.out_dtype is not None else out_dtype)
            for r, out in zip(roundings, outs)]
