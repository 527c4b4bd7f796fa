"""Tests of harness.matrix: expansion, ids, filter, shard, the shipped matrices, and refusals."""
from __future__ import annotations

from collections import Counter

import copy
import os
import random
import re
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # also under plain `pytest`
from harness import matrix as M  # noqa: E402
from harness.schema import LAYOUTS  # noqa: E402
from harness.matrix import MatrixError, compile_key, filter_cases, load_suite, load_tolerances, shard  # noqa: E402
from harness.schema import AXES, Case  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CASES = ROOT / "cases"
BAD = Path(__file__).resolve().parent / "bad_cases"

HEAD = """\
sequences:
  s: [[1, 20], [4, 30]]
  t: [[1, 100]]
defaults:
  out_dtype: bf16
  scales: [0.75, 0.5, 0.25]
  heads: [4, 2]
  head_size: 64
  block_size: 16
  seqs: s
"""


def suite(tmp_path, text, head=HEAD, name="m.yaml"):
    shutil.copy(CASES / "tolerances.yaml", tmp_path / "tolerances.yaml")
    p = tmp_path / name
    p.write_text(head + text)
    return load_suite(p)


def ids(s):
    return [c.id for c in s.cases]


# ----------------------------------------------------------------------------- expansion


def test_cartesian_product(tmp_path):
    s = suite(tmp_path, """\
matrix:
  - dtypes: [[fp8, fp8], [bf16, fp8]]
    heads: [[4, 2], [8, 8]]
    block_size: [16, 32, 48]
""")
    assert len(s.cases) == 2 * 2 * 3
    assert len(set(ids(s))) == 12
    assert {(c.q_dtype, c.heads, c.block_size) for c in s.cases} == {
        (q, h, b) for q in ("fp8", "bf16") for h in ((4, 2), (8, 8)) for b in (16, 32, 48)}
    c = s.cases[0]
    assert c.seq_lens == ((1, 20), (4, 30)) and c.source == "m.yaml"
    assert (c.window, c.softcap, c.causal, c.path, c.layout, c.seed, c.scale_layout) == (
        -1, 0.0, True, "2d", "contiguous", 0, "tensor")


def test_separate_dtype_axes_and_defaults(tmp_path):
    s = suite(tmp_path, """\
matrix:
  - q_dtype: [fp8, bf16, fp16]
    kv_dtype: fp8
  - q_dtype: bf16               # kv_dtype from defaults' dtypes is replaced: set both
    kv_dtype: bf16
""", head=HEAD + "  dtypes: [fp8, fp8]\n")
    assert [(c.q_dtype, c.kv_dtype) for c in s.cases] == [
        ("fp8", "fp8"), ("bf16", "fp8"), ("fp16", "fp8"), ("bf16", "bf16")]


def test_exclude(tmp_path):
    s = suite(tmp_path, """\
matrix:
  - dtypes: [[fp8, fp8], [bf16, fp8]]
    block_size: [16, 48]
    seqs: [s, t]
    exclude:
      - {dtypes: [bf16, fp8], block_size: 48}
      - {seqs: t, block_size: 16}
""")
    got = {(c.q_dtype, c.block_size, c.seqs) for c in s.cases}
    assert got == {("fp8", 16, "s"), ("fp8", 48, "s"), ("fp8", 48, "t"), ("bf16", 16, "s")}


def test_include_expands_over_remaining_block_lists(tmp_path):
    s = suite(tmp_path, """\
matrix:
  - dtypes: [fp8, fp8]
    block_size: [16, 32]
    exclude: [{block_size: 32}]
    include:
      - {dtypes: [fp16, fp8], head_size: 256}   # block_size still [16, 32]: 2 cases
      - {block_size: 48, window: 8}             # 1 case
""")
    got = sorted((c.q_dtype, c.head_size, c.block_size, c.window) for c in s.cases)
    assert got == sorted([("fp8", 64, 16, -1), ("fp16", 256, 16, -1), ("fp16", 256, 32, -1),
                          ("fp8", 64, 48, 8)])


def test_override(tmp_path):
    s = suite(tmp_path, """\
matrix:
  - dtypes: [fp8, fp8]
    head_size: [64, 256]
    override:
      - {match: {head_size: 256}, set: {num_blocks: 512}}
      - {match: {head_size: 256, num_blocks: 512}, set: {seed: 3}}   # sees the earlier override
""")
    by_d = {c.head_size: c for c in s.cases}
    assert by_d[256].num_blocks == 512 and by_d[256].seed == 3
    assert by_d[256].id.endswith(",nb=512,seed=3")
    assert by_d[64].num_blocks == M.default_num_blocks(by_d[64].seq_lens, 16)
    assert "nb=" not in by_d[64].id


def test_num_blocks_default():
    # s: kv 20 and 30 at block 16 -> 2 + 2 = 4 blocks, + max(4, 25%) spare
    assert M.blocks_needed(((1, 20), (4, 30)), 16) == 4
    assert M.default_num_blocks(((1, 20), (4, 30)), 16) == 8
    assert M.default_num_blocks(tuple((1, 4096) for _ in range(16)), 16) == 16 * 256 + 16 * 64


def test_duplicates_merge_and_non_fp8_scales_collapse(tmp_path):
    s = suite(tmp_path, """\
matrix:
  - dtypes: [[bf16, bf16], [fp8, fp8]]
    scales: [[0.75, 0.5, 0.25], [1.0, 1.0, 1.0]]
    scale_layout: [tensor, per_seq_head]
  - dtypes: [fp8, fp8]                # the same cases again
    scales: [1.0, 1.0, 1.0]
  - dtypes: [fp8, fp8]
    num_blocks: 8                     # = the computed default: same case, same id
    scales: [1.0, 1.0, 1.0]
""")
    assert len(s.cases) == 1 + 4
    ctrl = [c for c in s.cases if c.q_dtype == "bf16"]
    assert len(ctrl) == 1 and ctrl[0].scales == (1.0, 1.0, 1.0) and ctrl[0].scale_layout == "tensor"
    assert "scales" not in ctrl[0].id
    assert s.cases[0].source == "m.yaml"


def test_yaml_1_2_floats(tmp_path):
    s = suite(tmp_path, "matrix:\n  - dtypes: [fp8, fp8]\n    scales: [4e-3, 1e0, 2.5E-1]\n")
    assert s.cases[0].scales == (0.004, 1.0, 0.25)


# ----------------------------------------------------------------------------- ids


def test_id_format_and_optional_parts(tmp_path):
    s = suite(tmp_path, """\
matrix:
  - dtypes: [fp8, fp8]
    heads: [8, 2]
    head_size: 128
    seqs: t
  - dtypes: [bf16, bf16]
    scale_layout: per_seq_head
    window: 128
    softcap: 30
    causal: false
    path: 3d
    layout: strided
    num_blocks: 99
    seed: 3
""")
    assert ids(s) == [
        "q=fp8,kv=fp8,out=bf16,gqa=8:2,d=128,bs=16,seqs=t,scales=0.75/0.5/0.25",
        "q=bf16,kv=bf16,out=bf16,gqa=4:2,d=64,bs=16,seqs=s,win=128,softcap=30,noncausal,path=3d,"
        "layout=strided,nb=99,seed=3",
    ]
    assert M._fmt(0.1234567891) == "0.1234567891" and M._fmt(0.004) == "0.004"


def test_ids_stable_unique_readable():
    a = load_suite(CASES / "smoke.yaml")
    b = load_suite(CASES / "smoke.yaml")
    assert ids(a) == ids(b)
    for s in (a, load_suite(CASES / "default.yaml")):
        assert len(set(ids(s))) == len(s.cases)
        for c in s.cases:
            assert re.fullmatch(r"q=\w+,kv=\w+,out=\w+,gqa=\d+:\d+,d=\d+,bs=\d+,seqs=\w+[\w=,./:]*", c.id), c.id
            # the id determines the case
            assert M.case_id(c) == c.id


# ----------------------------------------------------------------------------- filter, shard


@pytest.fixture(scope="module")
def smoke():
    return load_suite(CASES / "smoke.yaml")


@pytest.fixture(scope="module")
def default():
    return load_suite(CASES / "default.yaml")


def test_filter(smoke):
    cs = smoke.cases
    assert filter_cases(cs, "") == cs
    got = filter_cases(cs, "q_dtype=fp8,block_size=48,heads=8:2")
    assert got and all(c.q_dtype == "fp8" and c.block_size == 48 and c.heads == (8, 2) for c in got)
    assert filter_cases(cs, "q=fp8,bs=48,gqa=8:2") == got                      # id short names
    assert filter_cases(cs, "seqs=prefill") == [c for c in cs if c.seqs == "prefill"]
    assert filter_cases(cs, "causal=false") == [c for c in cs if not c.causal]
    assert filter_cases(cs, "softcap=30") == [c for c in cs if c.softcap == 30]
    assert filter_cases(cs, "scales=1/1/1,q_dtype=fp8") == [
        c for c in cs if c.scales == (1, 1, 1) and c.q_dtype == "fp8"]
    assert filter_cases(cs, "block_size=32|64") == [c for c in cs if c.block_size in (32, 64)]
    assert filter_cases(cs, "path=3d") == [c for c in cs if c.path == "3d"]
    assert filter_cases(cs, "seqs=decode") and filter_cases(cs, "seqs=nope") == []
    sub = filter_cases(cs, "gqa=32:1")                                         # substring form
    assert sub and sub == filter_cases(cs, "heads=32:1")
    assert filter_cases(cs, "noncausal") == [c for c in cs if not c.causal]
    assert filter_cases(cs, "q=fp8,noncausal") == [c for c in cs if not c.causal and c.q_dtype == "fp8"]
    with pytest.raises(MatrixError) as e:
        filter_cases(cs, "q_dtype=fp8,blocksize=16")
    assert "blocksize" in str(e.value) and e.value.field == "blocksize" and "\n" not in str(e.value)


def test_shard(default):
    cs = default.cases
    for n in (1, 3, 7):
        parts = [shard(cs, k, n) for k in range(1, n + 1)]
        seen = [c.id for p in parts for c in p]
        assert sorted(seen) == sorted(c.id for c in cs)                        # disjoint, complete
        sizes = [len(p) for p in parts]
        largest_group = max(Counter(compile_key(c) for c in cs).values())
        assert max(sizes) - min(sizes) <= largest_group                         # balanced by groups
        for key in {compile_key(c) for c in cs}:                                # a variant in one shard
            assert sum(any(compile_key(c) == key for c in p) for p in parts) == 1
        assert parts == [shard(list(reversed(cs)), k, n)[::-1] for k in range(1, n + 1)]  # order-free
    for bad in ((0, 3), (4, 3), (1, 0), ("1", 2)):
        with pytest.raises(MatrixError):
            shard(cs, *bad)


# ----------------------------------------------------------------------------- shipped matrices


def test_smoke_covers_every_axis_value(smoke):
    cs = smoke.cases
    assert 40 <= len(cs) <= 64  # the interpreter's smoke run stays within 5 minutes on 2 cores

    def seen(f):
        return {f(c) for c in cs}

    assert seen(lambda c: (c.q_dtype, c.kv_dtype)) == set(M.SUPPORTED_PAIRS)
    assert seen(lambda c: c.out_dtype) == {"bf16", "fp16"}
    fp8 = [c for c in cs if "fp8" in (c.q_dtype, c.kv_dtype)]
    assert {c.scales for c in fp8} >= {(0.75, 0.5, 0.25), (1.0, 1.0, 1.0)}
    assert any(max(c.scales) * 448 < 2.0 for c in fp8)   # saturating: 448*scale within 2 std of every input
    assert {c.scale_layout for c in fp8} == {"tensor", "per_seq_head"}
    assert seen(lambda c: c.heads[0] // c.heads[1]) >= {1, 2, 4, 8}
    assert any(c.heads[1] == 1 and c.heads[0] >= 16 for c in cs)   # MQA
    assert (4, 4) in seen(lambda c: c.heads) and (4, 2) in seen(lambda c: c.heads)
    assert seen(lambda c: c.head_size) == {64, 80, 128, 256}
    assert 1 <= sum(c.head_size == 256 for c in cs) <= 2
    assert seen(lambda c: c.block_size) == {16, 32, 48, 64}
    assert seen(lambda c: c.seqs) == {"decode", "prefill", "chunked", "mixed", "decode_tiny"}
    assert seen(lambda c: c.window != -1) == {True, False}
    assert seen(lambda c: c.softcap > 0) == {True, False}
    assert sum(not c.causal for c in cs) == 1
    assert seen(lambda c: c.path) == {"2d", "3d"}
    assert seen(lambda c: c.layout) == set(LAYOUTS)
    assert seen(lambda c: c.seed) == {0, 1}
    # tiny: fits the CPU interpreter
    assert all(len(c.seq_lens) <= 4 and max(kv for _, kv in c.seq_lens) <= 100 for c in cs)
    # sequence mixes are what they say
    mixes = {c.seqs: c.seq_lens for c in cs}
    assert all(q == 1 for q, _ in mixes["decode"])
    assert all(q == kv for q, kv in mixes["prefill"])
    assert all(1 < q < kv for q, kv in mixes["chunked"])
    assert len({q == 1 for q, _ in mixes["mixed"]}) == 2


def test_default_matrix(default):
    cs = default.cases
    assert len(cs) >= 500
    seen = lambda f: {f(c) for c in cs}  # noqa: E731
    assert seen(lambda c: (c.q_dtype, c.kv_dtype)) == set(M.SUPPORTED_PAIRS)
    assert seen(lambda c: c.out_dtype) == {"bf16", "fp16"}
    assert {c.scales for c in cs} >= {(0.75, 0.5, 0.25), (1.0, 1.0, 1.0), (0.004, 0.004, 0.004)}
    assert seen(lambda c: c.heads[0] // c.heads[1]) >= {1, 2, 4, 8, 16, 32}
    assert seen(lambda c: c.heads) >= {(32, 8), (32, 4), (32, 2), (32, 1)}
    assert seen(lambda c: c.head_size) == {64, 80, 96, 128, 256}
    assert seen(lambda c: c.block_size) == {16, 32, 48, 64}
    assert seen(lambda c: c.seqs) >= {"decode", "prefill", "chunked", "mixed"}
    assert max(kv for c in cs for _, kv in c.seq_lens) >= 4096
    assert len(next(c for c in cs if c.seqs == "decode").seq_lens) == 16
    for f in (lambda c: c.window != -1, lambda c: c.softcap > 0, lambda c: c.path,
              lambda c: c.seed, lambda c: c.scale_layout):
        assert len(seen(f)) == 2
    assert seen(lambda c: c.layout) == set(LAYOUTS)
    for c in cs:
        assert default.tolerances.for_case(c)


def test_tolerances(smoke):
    t = smoke.tolerances
    assert t.rules == ["tolerance", "adaptive"]
    assert set(t.adaptive) == {"mult", "atol", "mean_mult"}
    assert len(t.by_dtype) == 10
    c = smoke.cases[0]
    assert set(t.for_case(c)) == {"atol", "rtol", "mean_atol"}
    assert t.for_case(c) == t.by_dtype[c.dtype_key]
    assert t.as_dict()["dtypes"] == t.by_dtype
    t2 = load_tolerances(BAD / "tol" / "missing_fp16.yaml")
    odd = next(x for x in smoke.cases if x.dtype_key == "fp8/fp8/fp16")
    with pytest.raises(MatrixError) as e:
        t2.for_case(odd)
    assert e.value.field == "fp8/fp8/fp16" and "missing_fp16.yaml" in str(e.value)


# ----------------------------------------------------------------------------- refusals


def _expect(path: Path) -> dict:
    return dict(re.findall(r"^# (\w+): (.*)$", path.read_text(), re.M))


BAD_FILES = sorted(BAD.glob("*.yaml"))


def test_bad_cases_cover_every_kind():
    names = {p.stem for p in BAD_FILES}
    for kind in ("yaml_syntax", "unknown_top_key", "unknown_axis", "wrong_type", "unknown_dtype",
                 "heads_not_divisible", "block_size_not_multiple", "kv_shorter_than_query",
                 "query_len_zero", "unknown_seqs", "empty_matrix", "missing_axis", "unsupported_pair",
                 "window_zero", "window_negative", "tol_missing_dtype_key", "tol_non_numeric",
                 "tol_unknown_key", "both_dtype_axes"):
        assert kind in names


@pytest.mark.parametrize("path", BAD_FILES, ids=[p.stem for p in BAD_FILES])
def test_refused(path):
    exp = _expect(path)
    with pytest.raises(MatrixError) as e:
        load_suite(str(path))
    err, msg = e.value, str(e.value)
    want_file = os.path.normpath(os.path.join(str(BAD), exp["file"])) if "file" in exp else str(path)
    assert "\n" not in msg and "\r" not in msg
    assert err.file == want_file and msg.startswith(want_file + ": ")
    assert (err.where or "-") == exp["where"]
    assert (err.field or "-") == exp["field"]
    if err.where:
        assert f": {err.where}: " in msg
    if err.field:
        assert f"field '{err.field}'" in msg
    assert exp["says"] in msg


def test_message_shape(tmp_path):
    """The one-line form: file: block (name): field 'x': problem."""
    with pytest.raises(MatrixError) as e:
        suite(tmp_path, """\
matrix:
  - {dtypes: [fp8, fp8]}
  - {dtypes: [fp8, fp8], head_size: 128}
  - {name: fp8_scales, dtypes: [fp8, fp8], block_size: 20}
""", name="x.yaml")
    assert str(e.value) == f"{tmp_path / 'x.yaml'}: matrix[2] (fp8_scales): field 'block_size': 20 is not a multiple of 8"
    assert (e.value.where, e.value.field) == ("matrix[2] (fp8_scales)", "block_size")


def test_mutations_only_raise_matrix_error():
    """Random wrong values anywhere in the smoke matrix: refused as MatrixError or accepted."""
    doc = M._read_yaml(str(CASES / "smoke.yaml"))
    spots = []

    def walk(node, path):
        spots.append(path)
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in items:
            walk(v, path + (k,))

    walk(doc, ())
    junk = [None, "x", "", 0, -1, 7, 2.5, True, [], [1], [[1, 2]], {}, {"a": 1}, float("nan")]
    rng = random.Random(0)
    for path in rng.sample(spots, min(len(spots), 150)):
        for j in rng.sample(junk, 4):
            d = copy.deepcopy(doc)
            if path:
                node = d
                for k in path[:-1]:
                    node = node[k]
                node[path[-1]] = j
            else:
                d = j
            try:
                M._build(d, "smoke.yaml")
            except MatrixError as e:
                assert "\n" not in str(e)


def test_all_axes_known():
    # every Case axis is an axis of the matrix format, and nothing else
    assert set(M._parsers({})) == set(AXES) | {"dtypes"}
    assert set(AXES) <= set(Case.__dataclass_fields__)


def test_shared_blocks_with_per_sequence_scales_is_refused(tmp_path):
    with pytest.raises(MatrixError) as e:
        suite(tmp_path, """\
matrix:
  - dtypes: [fp8, fp8]
    layout: shared_blocks
    scale_layout: per_seq_head
""")
    assert e.value.field == "layout" and "scale_layout tensor" in str(e.value) and "\n" not in str(e.value)
