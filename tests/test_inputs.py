"""Seeded inputs: reproducible bit for bit, never tidy, and laid out as each case asks."""
import dataclasses

import torch

import harness  # noqa: F401
from harness.inputs import build_inputs, counter_normal, e2e_key
from harness.matrix import case_id, default_num_blocks
from harness.schema import Case

SEQS = ((1, 40), (5, 37), (17, 70), (3, 3))


def case(**over):
    c = Case(q_dtype="fp8", kv_dtype="fp8", out_dtype="bf16", scales=(0.75, 0.5, 0.25), heads=(8, 2),
             head_size=64, block_size=16, num_blocks=default_num_blocks(SEQS, 16), seqs="t", seq_lens=SEQS)
    c = dataclasses.replace(c, **over)
    return dataclasses.replace(c, id=case_id(c))


def test_counter_normal_is_reproducible_and_standard():
    a = counter_normal((4096, 64), seed=3, stream=1, device="cpu")
    assert torch.equal(a, counter_normal((4096, 64), seed=3, stream=1, device="cpu"))
    assert not torch.equal(a, counter_normal((4096, 64), seed=3, stream=2, device="cpu"))
    assert not torch.equal(a, counter_normal((4096, 64), seed=4, stream=1, device="cpu"))
    assert abs(float(a.mean())) < 0.01 and abs(float(a.std()) - 1) < 0.01
    assert float(a.abs().max()) < 3.47 and int((a == 0).sum()) < a.numel() // 100
    # Pinned values: a change to the generator changes every case's inputs, on every device.
    first = counter_normal((4,), seed=0, stream=0, device="cpu").tolist()
    assert first == counter_normal((4,), seed=0, stream=0, device="cpu").tolist()
    assert all(-3.47 < x < 3.47 and x != 0 for x in first)


def test_counter_normal_triton_kernel_matches_the_torch_steps():
    # The GPU path is one Triton kernel; here it runs under the interpreter: the bits must agree.
    for shape, seed, stream in (((3000,), 0, 0), ((7, 129, 5), 11, 2)):
        want = counter_normal(shape, seed, stream, "cpu", use_triton=False)
        if not torch.cuda.is_available():       # the interpreter runs Triton on CPU tensors
            assert torch.equal(counter_normal(shape, seed, stream, "cpu", use_triton=True), want)
        else:
            assert torch.equal(counter_normal(shape, seed, stream, "cuda").cpu(), want)
            assert torch.equal(counter_normal(shape, seed, stream, "cuda", use_triton=False).cpu(), want)


def test_same_case_same_inputs():
    a, b = build_inputs(case()), build_inputs(case())
    for key in ("q", "k", "v", "block_table", "k_descale"):
        x, y = a.kernel_kwargs[key], b.kernel_kwargs[key]
        assert torch.equal(x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x,
                           y.view(torch.uint8) if y.dtype == torch.float8_e4m3fn else y), key


def test_block_table_is_a_random_permutation_with_unused_blocks():
    c = case()
    table = build_inputs(c).kernel_kwargs["block_table"]
    used = [int(b) for s, (_, kl) in enumerate(SEQS) for b in table[s, :-(-kl // 16)]]
    assert len(set(used)) == len(used) < c.num_blocks                 # no sharing, some blocks unused
    assert used != sorted(used)                                         # not tidy


def test_block_table_has_spare_columns_except_in_the_exact_table_layout():
    needed = max(-(-kl // 16) for _, kl in SEQS)
    assert build_inputs(case()).kernel_kwargs["block_table"].shape == (len(SEQS), needed + 3)
    exact = build_inputs(case(layout="exact_table")).kernel_kwargs["block_table"]
    assert exact.shape == (len(SEQS), needed) and exact.is_contiguous()
    # nothing after its last entry: a read past it leaves the tensor's own memory
    assert exact.untyped_storage().nbytes() == exact.numel() * exact.element_size()


def test_shared_blocks_share_a_first_block_holding_the_same_tokens():
    inputs = build_inputs(case(layout="shared_blocks"))
    table, k = inputs.kernel_kwargs["block_table"], inputs.kernel_kwargs["k"]
    sharers = [s for s, (ql, kl) in enumerate(SEQS) if kl - ql >= 16]
    assert len(sharers) >= 2
    assert len({int(table[s, 0]) for s in sharers}) == 1
    assert int(table[3, 0]) != int(table[sharers[0], 0])                # too short to share
    # the unquantized reference's compact cache agrees token for token
    e2e_table, k_hp = inputs.e2e_kwargs["block_table"], inputs.e2e_kwargs["k_cache"]
    assert torch.equal(k_hp[e2e_table[sharers[0], 0]], k_hp[e2e_table[sharers[1], 0]])
    assert k[table[sharers[0], 0]].view(torch.uint8).ne(0).any()


def test_strided_layout_gives_non_contiguous_views():
    kw = build_inputs(case(layout="strided")).kernel_kwargs
    assert not kw["q"].is_contiguous() and not kw["out"].is_contiguous()
    assert kw["block_table"].stride(0) > kw["block_table"].shape[1]


def test_output_is_poisoned_and_inputs_are_never_zero():
    inputs = build_inputs(case())
    assert torch.isnan(inputs.kernel_kwargs["out"]).all()
    assert inputs.kernel_kwargs["q"].float().abs().sum() > 0


def e2e_tensors(c):
    kw = build_inputs(c).e2e_kwargs
    return {k: v for k, v in kw.items() if isinstance(v, torch.Tensor)}, {k: v for k, v in kw.items()
                                                                          if not isinstance(v, torch.Tensor)}


def test_cases_with_one_e2e_key_have_bitwise_equal_unquantized_inputs():
    # The verify run computes the e2e reference once per e2e_key: everything outside the key must
    # leave the unquantized attention untouched, bit for bit.
    base = case()
    tensors, scalars = e2e_tensors(base)
    for other in (case(q_dtype="bf16", kv_dtype="bf16", out_dtype="fp16"), case(scales=(0.25, 0.5, 0.75)),
                  case(scale_layout="per_seq_head"), case(path="3d"), case(num_blocks=base.num_blocks + 50)):
        assert e2e_key(other) == e2e_key(base)
        t, sc = e2e_tensors(other)
        assert sc == scalars
        assert all(torch.equal(t[k], tensors[k]) for k in tensors), other.id
    for other in (case(seed=1), case(block_size=32, num_blocks=default_num_blocks(SEQS, 32)),
                  case(layout="shared_blocks"), case(window=8), case(softcap=30.0), case(causal=False)):
        assert e2e_key(other) != e2e_key(base)


def test_saturation_counts_match_the_reference_count_on_the_unquantized_tensors():
    from reference import count_saturated
    c = case(scales=(0.004, 0.004, 0.003))          # tensor-wide scales small enough to saturate
    inputs = build_inputs(c)
    e2e = inputs.e2e_kwargs
    # Only the slots a kernel reads count: the first kv_len tokens of each sequence's blocks.
    read = [e2e["block_table"][s, t // 16] * 16 + t % 16 for s, (_, kl) in enumerate(SEQS) for t in range(kl)]
    k_read = e2e["k_cache"].flatten(0, 1)[torch.stack(read)]
    v_read = e2e["v_cache"].flatten(0, 1)[torch.stack(read)]
    want = {"q": count_saturated(e2e["q"], 0.004), "k": count_saturated(k_read, 0.004),
            "v": count_saturated(v_read, 0.003)}
    assert inputs.saturated == want and all(n > 0 for n in want.values())
    assert count_saturated(e2e["k_cache"], 0.004) > want["k"]     # the tail slots hold some too
    assert build_inputs(case()).saturated == {"q": 0, "k": 0, "v": 0}
