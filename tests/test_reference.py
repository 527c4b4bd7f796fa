"""Checks of the float32/float64 reference against an independent per-sequence formulation."""
import math

import pytest
import torch
import torch.nn.functional as F

from reference import (FP8_DTYPE, FP8_MAX, LowPrecision, block_scale, count_saturated, dequantize,
                       expand_scale, paged_attention_ref, paged_attention_refs, quantize, token_scale)
from reference.attention import SMALL_GROUP, _plan

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MIXED = ((1, 40), (5, 18), (17, 70))


# --------------------------------------------------------------------------- quantization

def test_quantize_clamps():
    q = quantize(torch.tensor([500.0, -1000.0, 448.0, -448.0, 3.0]), 1.0)
    assert q.dtype == FP8_DTYPE
    assert q.float().tolist() == [448.0, -448.0, 448.0, -448.0, 3.0]
    assert not torch.isnan(q.float()).any()


def _in_range_values(n, scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    # log-uniform over the normal e4m3 range, both signs
    mag = torch.exp2(torch.empty(n).uniform_(-6, math.log2(FP8_MAX), generator=g))
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    return mag * sign * scale


@pytest.mark.parametrize("scale", [1.0, 0.75, 0.5, 0.25])
def test_round_trip_and_saturation(scale):
    x = _in_range_values(4096, scale)
    y = dequantize(quantize(x, scale), scale)
    assert y.dtype == torch.float32
    assert ((y - x).abs() / x.abs()).max().item() <= 2 ** -4
    assert count_saturated(x, scale) == 0

    big = torch.tensor([1.5, -2.0, 1.01, 0.5, -0.99]) * FP8_MAX * scale
    assert count_saturated(big, scale) == 3
    deq = dequantize(quantize(big, scale), scale)
    assert deq[:3].tolist() == [FP8_MAX * scale, -FP8_MAX * scale, FP8_MAX * scale]

    # one-element tensor scales behave like the float
    t = torch.tensor([scale])
    assert torch.equal(quantize(x, t).float(), quantize(x, scale).float())
    assert count_saturated(big, t) == 3


def test_broadcast_scale_and_dtype():
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    s = torch.tensor([[0.25], [0.5], [0.75]])
    q = quantize(x, s)
    assert torch.equal(q.float(), torch.cat([quantize(x[i], s[i].item()).float()[None] for i in range(3)]))
    assert dequantize(q, s, torch.float64).dtype == torch.float64


def test_scale_layout_helpers():
    assert torch.equal(expand_scale(None, 2, 3), torch.ones(2, 3))
    assert torch.equal(expand_scale(torch.tensor([0.5]), 2, 3), torch.full((2, 3), 0.5))
    per = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert torch.equal(expand_scale(per, 2, 2), per)
    with pytest.raises(ValueError):
        expand_scale(torch.ones(3, 2), 2, 2)

    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    ts = token_scale(per, cu, num_q_heads=4, num_kv_heads=2, num_tokens=6)
    assert ts.shape == (6, 4, 1)
    assert ts[:, :, 0].tolist() == [[1, 1, 2, 2]] * 2 + [[3, 3, 4, 4]] * 3 + [[1, 1, 1, 1]]

    bt = torch.tensor([[4, 0, 0], [1, 3, 2]], dtype=torch.int32)
    bs = block_scale(per, bt, torch.tensor([5, 17], dtype=torch.int32), num_blocks=6,
                     block_size=8, num_kv_heads=2)
    assert bs.shape == (6, 1, 2, 1)
    assert bs[:, 0, :, 0].tolist() == [[1, 1], [3, 4], [3, 4], [3, 4], [1, 2], [1, 1]]


# --------------------------------------------------------------------------- attention inputs

def make_inputs(seq_lens, heads, head_size, block_size, *, fp8=False, scales=(0.75, 0.5, 0.25),
                per_seq_head=False, amp=1.0, extra_tokens=0, seed=0):
    """Random paged inputs. Blocks come from a random permutation of more blocks than needed;
    unused table entries and cache slots hold garbage, so masking/layout bugs show up."""
    g = torch.Generator().manual_seed(seed)
    hq, hkv = heads
    rep = hq // hkv
    num_seqs = len(seq_lens)
    q_lens = [ql for ql, _ in seq_lens]
    kv_lens = [kl for _, kl in seq_lens]
    nblk = [-(-kl // block_size) for kl in kv_lens]
    num_blocks = sum(nblk) + 7
    width = max(nblk) + 2
    perm = torch.randperm(num_blocks, generator=g).tolist()
    block_table = torch.randint(0, num_blocks, (num_seqs, width), generator=g, dtype=torch.int32)
    it = iter(perm)
    for s in range(num_seqs):
        for b in range(nblk[s]):
            block_table[s, b] = next(it)

    if per_seq_head:
        mult = 1.0 + 0.25 * torch.arange(num_seqs * hkv, dtype=torch.float32).reshape(num_seqs, hkv)
        descales = [sc * mult for sc in scales]
    else:
        descales = [torch.tensor([sc], dtype=torch.float32) for sc in scales]

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * amp

    def qz(x, d):  # d: [num_seqs, hkv] or one element; quantize in the logical (per-seq) domain
        return quantize(x, d) if fp8 else x.to(torch.bfloat16)

    cache_dtype = FP8_DTYPE if fp8 else torch.bfloat16
    k_cache = rnd(num_blocks, block_size, hkv, head_size).to(cache_dtype)
    v_cache = rnd(num_blocks, block_size, hkv, head_size).to(cache_dtype)
    num_tokens = sum(q_lens) + extra_tokens
    q = rnd(num_tokens, hq, head_size).to(cache_dtype)
    cu = [0]
    for s in range(num_seqs):
        dq, dk, dv = (d.reshape(1, 1).expand(1, hkv) if d.numel() == 1 else d[s].reshape(1, hkv)
                      for d in descales)
        qs = q_lens[s]
        q[cu[-1]:cu[-1] + qs] = qz(rnd(qs, hq, head_size), dq.repeat_interleave(rep, 1).reshape(1, hq, 1))
        kl = kv_lens[s]
        kq = qz(rnd(kl, hkv, head_size), dk.reshape(1, -1, 1))
        vq = qz(rnd(kl, hkv, head_size), dv.reshape(1, -1, 1))
        for j in range(kl):
            blk = int(block_table[s, j // block_size])
            k_cache[blk, j % block_size] = kq[j]
            v_cache[blk, j % block_size] = vq[j]
        cu.append(cu[-1] + qs)

    dev = DEVICE
    return dict(
        q=q.to(dev), k_cache=k_cache.to(dev), v_cache=v_cache.to(dev),
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev),
        seqused_k=torch.tensor(kv_lens, dtype=torch.int32, device=dev),
        block_table=block_table.to(dev),
        q_descale=descales[0].to(dev), k_descale=descales[1].to(dev), v_descale=descales[2].to(dev),
        softmax_scale=head_size ** -0.5,
    )


def independent_ref(inp, *, causal=True, window_size=(-1, -1), softcap=0.0):
    """Per sequence: python loop over blocks, explicit dequant and mask, SDPA in float64."""
    q, kc, vc = inp["q"], inp["k_cache"], inp["v_cache"]
    cu = inp["cu_seqlens_q"].tolist()
    kv = inp["seqused_k"].tolist()
    bt = inp["block_table"].tolist()
    bs = kc.shape[1]
    hq, hkv = q.shape[1], kc.shape[2]
    fp8 = q.dtype == FP8_DTYPE
    left, right = window_size
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)

    def ds(name, s, h):
        d = inp[name]
        return float(d.reshape(-1)[0]) if d.numel() == 1 else float(d[s, h])

    for s in range(len(kv)):
        ql, kl = cu[s + 1] - cu[s], kv[s]
        if ql == 0:
            continue
        kb = [kc[bt[s][b]] for b in range(-(-kl // bs))]
        vb = [vc[bt[s][b]] for b in range(-(-kl // bs))]
        K = torch.cat(kb)[:kl].double()
        V = torch.cat(vb)[:kl].double()
        Q = q[cu[s]:cu[s + 1]].double()
        if fp8:
            for h in range(hkv):
                K[:, h] *= ds("k_descale", s, h)
                V[:, h] *= ds("v_descale", s, h)
            for h in range(hq):
                Q[:, h] *= ds("q_descale", s, h // (hq // hkv))
        mask = torch.zeros(ql, kl, dtype=torch.bool, device=q.device)
        for i in range(ql):
            qpos = kl - ql + i
            for j in range(kl):
                ok = (not causal or j <= qpos) and (left < 0 or j >= qpos - left) \
                    and (right < 0 or j <= qpos + right)
                mask[i, j] = ok
        Qh, Kh, Vh = Q.transpose(0, 1), K.transpose(0, 1), V.transpose(0, 1)  # [H, L, D]
        if softcap == 0:
            o = F.scaled_dot_product_attention(Qh[None], Kh[None], Vh[None], attn_mask=mask,
                                               scale=inp["softmax_scale"], enable_gqa=True)[0]
        else:
            Kr = Kh.repeat_interleave(hq // hkv, 0)
            Vr = Vh.repeat_interleave(hq // hkv, 0)
            S = torch.einsum("hqd,hkd->hqk", Qh, Kr) * inp["softmax_scale"]
            S = softcap * torch.tanh(S / softcap)
            S = S.masked_fill(~mask, float("-inf"))
            o = torch.einsum("hqk,hkd->hqd", torch.softmax(S, -1), Vr)
        out[cu[s]:cu[s + 1]] = o.transpose(0, 1)
    return out


def run_ref(inp, **kw):
    keys = ("q", "k_cache", "v_cache")
    return paged_attention_ref(*(inp[k] for k in keys), **{k: v for k, v in inp.items() if k not in keys}, **kw)


# --------------------------------------------------------------------------- attention vs independent

MODES = {
    "bf16": dict(),
    "window": dict(window_size=(7, 0)),
    "softcap": dict(softcap=10.0, amp=3.0),
    "fp8_tensor": dict(fp8=True),
    "fp8_per_seq_head": dict(fp8=True, per_seq_head=True),
    "fp8_window_softcap_f64": dict(fp8=True, per_seq_head=True, window_size=(7, 0), softcap=10.0,
                                   compute_dtype=torch.float64),
    "f64": dict(compute_dtype=torch.float64),
    "noncausal_window": dict(causal=False, window_size=(5, 3), fp8=True),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("block_size", [16, 48])
@pytest.mark.parametrize("heads", [(8, 2), (4, 4), (4, 1)])
def test_matches_independent(heads, block_size, mode):
    cfg = dict(MODES[mode])
    attn = {k: cfg.pop(k) for k in ("causal", "window_size", "softcap") if k in cfg}
    cd = cfg.pop("compute_dtype", torch.float32)
    inp = make_inputs(MIXED, heads, 32, block_size, **cfg, seed=block_size + heads[0] * 10 + heads[1])
    got = run_ref(inp, compute_dtype=cd, **attn)
    want = independent_ref(inp, **attn)
    assert got.dtype == cd and got.device == inp["q"].device
    assert torch.isfinite(got).all()
    err = (got.double() - want).abs().max().item()
    assert err < (1e-10 if cd == torch.float64 else 1e-5), err


def test_descales_of_non_fp8_are_ignored():
    inp = make_inputs(MIXED, (4, 2), 32, 16)
    a = run_ref(inp)
    b = run_ref({**inp, "q_descale": None, "k_descale": None, "v_descale": None})
    assert torch.equal(a, b)


def test_empty_sequence_and_padding_tokens():
    lens = ((3, 10), (0, 12), (1, 1), (6, 6))
    inp = make_inputs(lens, (4, 2), 32, 16, fp8=True, per_seq_head=True, extra_tokens=3)
    got = run_ref(inp)
    want = independent_ref(inp)
    assert (got.double() - want).abs().max().item() < 1e-5
    assert torch.equal(got[-3:], torch.zeros_like(got[-3:]))


# --------------------------------------------------------------------------- low precision

def test_lowp_small_nonzero_difference():
    inp = make_inputs(MIXED, (8, 2), 64, 16, fp8=True, per_seq_head=True)
    exact = run_ref(inp)
    assert torch.equal(run_ref(inp, lowp=LowPrecision()), exact)
    assert torch.equal(run_ref(inp, lowp=LowPrecision(None, None, None)), exact)
    bf = torch.bfloat16
    for lp in (LowPrecision(bf, bf, bf), LowPrecision(bf, None, None), LowPrecision(None, bf, None),
               LowPrecision(None, None, bf)):
        got = run_ref(inp, lowp=lp)
        assert got.dtype == torch.float32
        d = (got - exact).abs().max().item()
        assert 0 < d < 5e-2, (lp, d)
    out_only = run_ref(inp, out_dtype=bf)
    assert torch.equal(out_only, exact.to(bf).float())
    assert torch.equal(out_only, run_ref(inp, lowp=LowPrecision(None, None, bf)))


def test_one_pass_roundings_equal_separate_calls():
    inp = make_inputs(MIXED, (8, 2), 64, 16, fp8=True, per_seq_head=True)
    keys = ("q", "k_cache", "v_cache")
    kw = {k: v for k, v in inp.items() if k not in keys}
    lp = LowPrecision(None, torch.float16, torch.bfloat16)
    exact, low = paged_attention_refs(*(inp[k] for k in keys), roundings=[None, lp], **kw)
    assert torch.equal(exact, run_ref(inp))
    assert torch.equal(low, run_ref(inp, lowp=lp))
    assert not torch.equal(exact, low)
    with pytest.raises(ValueError, match="qk_dtype"):
        paged_attention_refs(*(inp[k] for k in keys), roundings=[None, LowPrecision(torch.bfloat16)], **kw)


# --------------------------------------------------------------------------- chunking

@pytest.mark.parametrize("attn", [dict(), dict(window_size=(7, 0)), dict(causal=False, window_size=(5, 3)),
                                  dict(causal=False)])
def test_chunked_matches_unchunked(attn):
    lens = ((64, 200), (1, 90), (30, 30), (9, 40))
    heads = (4, 2)
    inp = make_inputs(lens, heads, 32, 16, fp8=True, per_seq_head=True)
    full = run_ref(inp, **attn)
    causal, window = attn.get("causal", True), attn.get("window_size", (-1, -1))
    for budget in (500, 4 * 40 * 4 * 9 * 2, 100_000):
        got = run_ref(inp, max_score_elements=budget, **attn)
        assert (got - full).abs().max().item() < 1e-6, budget
    # the smallest budget really splits the long sequence, the middle one groups two short ones
    assert len(_plan([q for q, _ in lens], [k for _, k in lens], heads[0], 500, causal, window)) > 10
    mid = _plan([q for q, _ in lens], [k for _, k in lens], heads[0], 4 * 40 * 4 * 9 * 2, causal, window)
    assert any(len(w.seqs) == 2 for w in mid)
    assert (full.double() - independent_ref(inp, **attn)).abs().max().item() < 1e-5


def test_plan_does_not_pad_decodes_to_a_long_chunk():
    # a 256-token chunk beside decodes of up to 4000 keys: one padded batch would hold 262M scores
    lens = [(1, 1500), (1, 37), (64, 64), (256, 2256), (1, 4000), (17, 300), (128, 900), (1, 1)]
    plan = _plan([q for q, _ in lens], [k for _, k in lens], 32, 2 ** 28, True, (-1, -1))
    padded = sum(len(w.seqs) * w.q_rows * (w.k_hi - w.k_lo) * 32 for w in plan)
    real = sum(q * k * 32 for q, k in lens)
    assert padded <= 2 * real + len(plan) * SMALL_GROUP
    assert padded < 2 ** 27                  # one padded batch held nearly 2 ** 28
    assert sorted(s for w in plan for s in w.seqs) == list(range(len(lens)))
    assert len(plan) <= 4                    # small sequences still share launches


def test_large_batch_plan_stays_under_budget():
    lens = [(8192, 8192)] * 4
    plan = _plan([q for q, _ in lens], [k for _, k in lens], 32, 2 ** 28, True, (-1, -1))
    assert all(len(w.seqs) * w.q_rows * (w.k_hi - w.k_lo) * 32 <= 2 ** 28 for w in plan)
    covered = sum(w.q_rows for w in plan)
    assert covered == 4 * 8192
