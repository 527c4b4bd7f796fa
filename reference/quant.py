"""FP8 (e4m3fn) quantization helpers and descale layouts.

A scale (or descale: the same number, seen from the kernel's side) is one of
  * None                        -> 1.0
  * a python float
  * a one-element float32 tensor
  * a float32 [num_seqs, num_kv_heads] tensor (one scale per sequence and kv head).
The helpers at the bottom turn the last form into something broadcastable over q
([num_tokens, num_q_heads, head_size]) or over a paged cache
([num_blocks, block_size, num_kv_heads, head_size]).
"""
from __future__ import annotations

from typing import Optional, Union

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0

Scale = Union[None, float, torch.Tensor]


def is_fp8(x: torch.Tensor) -> bool:
    """True for any 8-bit float dtype (e4m3fn, e5m2, fnuz variants)."""
    return x.dtype.is_floating_point and x.dtype.itemsize == 1


def _scale_on(scale: Scale, device, dtype=torch.float32):
    """A python float stays a float; a tensor is moved to `device`/`dtype`."""
    if scale is None:
        return 1.0
    if isinstance(scale, torch.Tensor):
        return scale.to(device=device, dtype=dtype)
    return float(scale)


def quantize(x: torch.Tensor, scale: Scale = 1.0) -> torch.Tensor:
    """x / scale, clamped to [-448, 448], cast to float8_e4m3fn.

    The clamp is explicit: e4m3fn has no inf, and an out-of-range cast gives NaN
    on some backends instead of saturating.
    """
    y = x.float() / _scale_on(scale, x.device)
    return torch.clamp(y, -FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize(x_fp8: torch.Tensor, scale: Scale = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x.to(dtype) * scale (the result stays in `dtype`)."""
    return x_fp8.to(dtype) * _scale_on(scale, x_fp8.device, dtype)


def count_saturated(x: torch.Tensor, scale: Scale = 1.0, as_tensor: bool = False):
    """Number of elements that quantize() clamps, i.e. with |x / scale| > 448; as_tensor: a 0-d
    int64 tensor on x's device, so a caller reads several counts in one transfer."""
    y = x.float() / _scale_on(scale, x.device)
    count = (y.abs() > FP8_MAX).sum()
    return count if as_tensor else int(count.item())


# --------------------------------------------------------------------------- scale layouts

def expand_scale(scale: Scale, num_seqs: int, num_kv_heads: int, *,
                 device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Any accepted scale form -> a [num_seqs, num_kv_heads] tensor."""
    if scale is None:
        scale = 1.0
    if not isinstance(scale, torch.Tensor):
        return torch.full((num_seqs, num_kv_heads), float(scale), dtype=dtype, device=device)
    s = scale.to(device=device if device is not None else scale.device, dtype=dtype)
    if s.numel() == 1:
        return s.reshape(1, 1).expand(num_seqs, num_kv_heads).contiguous()
    if tuple(s.shape) != (num_seqs, num_kv_heads):
        raise ValueError(f"scale of shape {tuple(s.shape)}: expected one element or "
                         f"[num_seqs, num_kv_heads] = [{num_seqs}, {num_kv_heads}]")
    return s


def token_scale(scale: Scale, cu_seqlens_q: torch.Tensor, num_q_heads: int, num_kv_heads: int, *,
                num_tokens: Optional[int] = None, device=None) -> torch.Tensor:
    """Scale for q: a float32 [num_tokens, num_q_heads, 1] tensor.

    Query head h of sequence s gets scale[s, h // (num_q_heads // num_kv_heads)].
    Tokens past cu_seqlens_q[-1] (padding) get 1.0.
    """
    device = device if device is not None else cu_seqlens_q.device
    cu = cu_seqlens_q.to(device=device, dtype=torch.long)
    num_seqs = cu.numel() - 1
    total = int(cu[-1].item())
    num_tokens = total if num_tokens is None else num_tokens
    per_seq = expand_scale(scale, num_seqs, num_kv_heads, device=device)
    per_seq = per_seq.repeat_interleave(num_q_heads // num_kv_heads, dim=1)      # [S, Hq]
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs, device=device), cu.diff(),
                                           output_size=total)
    out = torch.ones(num_tokens, num_q_heads, 1, dtype=torch.float32, device=device)
    out[:total, :, 0] = per_seq[seq_of_token]
    return out


def block_scale(scale: Scale, block_table: torch.Tensor, seqused_k: torch.Tensor, num_blocks: int,
                block_size: int, num_kv_heads: int) -> torch.Tensor:
    """Scale for a paged cache: a float32 [num_blocks, 1, num_kv_heads, 1] tensor.

    A block holding tokens of sequence s gets scale[s, :]; blocks no sequence uses get 1.0.
    Blocks are assumed not to be shared between sequences.
    """
    device = block_table.device
    num_seqs = block_table.shape[0]
    per_seq = expand_scale(scale, num_seqs, num_kv_heads, device=device)
    out = torch.ones(num_blocks, num_kv_heads, dtype=torch.float32, device=device)
    nblk = (seqused_k.to(device=device, dtype=torch.long) + block_size - 1) // block_size   # [S]
    cols = torch.arange(block_table.shape[1], device=device)
    used = cols[None, :] < nblk[:, None]                                                  # [S, M]
    seq_idx = torch.arange(num_seqs, device=device)[:, None].expand_as(used)
    out[block_table.long()[used]] = per_seq[seq_idx[used]]
    return out[:, None, :, None]
