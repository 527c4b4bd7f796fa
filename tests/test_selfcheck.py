"""harness.mutants and harness.selfcheck: the catalogue keeps up with the kernel, mutants run, and a
small end-to-end self-check catches the original FP8-query bug while the correct kernel passes."""
from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # also under plain `pytest`
from harness import mutants as MU  # noqa: E402
from harness.cli import main  # noqa: E402
from harness.matrix import load_suite  # noqa: E402
from harness.kernels import load_kernel  # noqa: E402
from harness.runner import DEFAULT_KERNEL, default_device  # noqa: E402
from harness.selfcheck import KILL_RATIO, run_selfcheck  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SOURCE_MUTATIONS = [m for m in MU.CATALOGUE if m.kind == MU.SOURCE]

TINY = """\
tolerances: {tolerances}
sequences:
  tiny: [[1, 40], [5, 18], [8, 8]]
defaults:
  out_dtype: bf16
  scales: [0.75, 0.5, 0.25]
  heads: [8, 2]
  head_size: 64
  block_size: 16
  seqs: tiny
matrix:
  - dtypes: [[fp8, fp8], [bf16, fp8]]
"""


@pytest.fixture(scope="module")
def tiny_suite(tmp_path_factory):
    path = tmp_path_factory.mktemp("cases") / "tiny.yaml"
    path.write_text(TINY.format(tolerances=ROOT / "cases" / "tolerances.yaml"))
    return path, load_suite(path)


# ---------------------------------------------------------------------------------------------- catalogue

def test_catalogue_entries_are_complete():
    assert len(MU.CATALOGUE) >= 12 and len(SOURCE_MUTATIONS) >= 5
    for m in MU.CATALOGUE:
        assert m.name and m.description and "\n" not in m.description and m.kind in (MU.SOURCE, MU.WRAPPER)


@pytest.mark.parametrize("mutation", SOURCE_MUTATIONS, ids=lambda m: m.name)
def test_every_source_mutation_still_applies(mutation):
    source = MU.kernel_source()
    assert source.count(mutation.old) == 1, f"{mutation.name} no longer matches kernel/unified_attention.py"
    assert MU.mutated_source(mutation, source) != source


def test_no_stale_mutations():
    assert MU.stale_mutations() == {}


def test_stale_mutation_is_reported():
    gone = MU.Mutation("renamed_away", "snippet the kernel no longer has", MU.SOURCE,
                       old="qk_scale *= q_scale_that_was_renamed", new="pass")
    twice = MU.Mutation("ambiguous", "snippet that occurs more than once", MU.SOURCE, old="tl.load(", new="tl.load(0+")
    with pytest.raises(MU.StaleMutation, match="renamed_away no longer applies to the current kernel source.*does not occur"):
        MU.mutated_source(gone, MU.kernel_source())
    with pytest.raises(MU.StaleMutation, match=r"ambiguous no longer applies.*occurs \d+ times"):
        MU.mutated_source(twice, MU.kernel_source())
    assert set(MU.stale_mutations([gone, twice, *SOURCE_MUTATIONS])) == {"renamed_away", "ambiguous"}
    # and the kernel edit that breaks a real entry is caught the same way
    edited = MU.kernel_source().replace("tile_hi = tl.cdiv(kv_end, TILE)", "tile_hi = tl.cdiv(kv_end, TILE)  # why")
    assert "last_partial_tile_dropped" in MU.stale_mutations(source=edited)


def test_catalogue_validation():
    with pytest.raises(ValueError, match="used twice"):
        MU._check_catalogue([MU.CATALOGUE[0], MU.CATALOGUE[0]])
    with pytest.raises(ValueError, match="different new one"):
        MU._check_catalogue([MU.Mutation("same", "d", MU.SOURCE, old="x", new="x")])
    with pytest.raises(ValueError, match="unknown variant"):
        MU.find(["no_such_variant"])


# ---------------------------------------------------------------------------------------------- mutants run

def _launch(fn, inputs, case):
    out = inputs.fresh_out()
    fn(**inputs.kernel_kwargs, split_kv=case.path == "3d", validate=True)
    return out.clone()


def test_mutated_module_imports_and_runs(tiny_suite):
    from harness.inputs import build_inputs
    from kernel import unified_attention
    _, suite = tiny_suite
    fp8_case, bf16_case = suite.cases
    with MU.MutantBuilder() as builder:
        variant = builder.build(MU.find(["q_scale_ignored"])[0])
        module = sys.modules[variant.__module__]
        assert variant.__module__.startswith("_kernel_mutant_q_scale_ignored_")
        assert Path(module.__file__).parent == builder.folder and module is not sys.modules["kernel.unified_attention"]
        assert "split_kv" in inspect.signature(variant).parameters
        # q scale matters with FP8 queries only: the copy is otherwise the same kernel, bit for bit
        inputs = build_inputs(bf16_case)
        assert torch.equal(_launch(variant, inputs, bf16_case), _launch(unified_attention, inputs, bf16_case))
        inputs = build_inputs(fp8_case)
        assert not torch.equal(_launch(variant, inputs, fp8_case), _launch(unified_attention, inputs, fp8_case))
        folder = builder.folder
    assert not folder.exists() and variant.__module__ not in sys.modules


def test_a_variant_is_a_kernel_under_test_by_its_name(tiny_suite):
    """`verify --kernel harness.mutants:NAME` runs a catalogue variant: the same build as the self-check's."""
    from harness.inputs import build_inputs
    _, suite = tiny_suite
    fp8_case = suite.cases[0]
    variant = load_kernel("harness.mutants:q_scale_ignored")
    assert variant.__module__.startswith("_kernel_mutant_q_scale_ignored_")
    inputs = build_inputs(fp8_case)
    with MU.MutantBuilder() as builder:
        same = builder.build(MU.find(["q_scale_ignored"])[0])
        assert torch.equal(_launch(variant, inputs, fp8_case), _launch(same, inputs, fp8_case))
    with pytest.raises(ValueError, match="has no callable no_such_variant"):
        load_kernel("harness.mutants:no_such_variant")


def test_wrapper_variant_forces_its_argument(monkeypatch):
    import kernel
    seen = []

    def fake(q, k, v, out, cu_seqlens_q, seqused_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
             window_size, block_table, softcap, q_descale, k_descale, v_descale, alibi_slopes=None, sinks=None,
             *, split_kv=None, config=None, validate=False):
        seen.append((softcap, split_kv))

    assert inspect.signature(fake) == inspect.signature(kernel.unified_attention)
    monkeypatch.setattr(kernel, "unified_attention", fake)
    variant = MU._wrapped_kernel(MU.find(["softcap_ignored"])[0])
    assert inspect.signature(variant) == inspect.signature(fake)
    variant(*range(12), softcap=30.0, q_descale=None, k_descale=None, v_descale=None, split_kv=True)
    variant(*range(13), None, None, None)   # softcap given by position
    assert seen == [(0.0, True), (0.0, None)]


# ---------------------------------------------------------------------------------------------- end to end

def test_selfcheck_catches_q_scale_ignored(tiny_suite):
    _, suite = tiny_suite
    run = run_selfcheck(suite.cases, suite.tolerances, 2, load_kernel(DEFAULT_KERNEL), default_device(),
                        mutations=MU.find(["q_scale_ignored", "v_scale_ignored"]))
    fp8_id, bf16_id = (c.id for c in suite.cases)
    q_scale, v_scale = run.variants
    assert q_scale.ratios[fp8_id] >= KILL_RATIO and q_scale.caught and q_scale.killed_by == [fp8_id]
    assert q_scale.ratios[bf16_id] < 1          # bf16 queries have no q scale to forget
    assert v_scale.caught and set(v_scale.killed_by) == {fp8_id, bf16_id}
    assert len(run.correct) == 4 and all(r.status == "PASS" for r in run.correct)
    assert run.correct_worst_ratio <= 0.5 and run.kill_rate == 1.0 and run.met
    sc = run.meta()
    assert sc["matrix"]["q_scale_ignored"][fp8_id] == q_scale.ratios[fp8_id]
    assert [v["name"] for v in sc["variants"]] == ["q_scale_ignored", "v_scale_ignored"] and sc["met"]


def test_stale_variant_fails_the_bar(tiny_suite):
    _, suite = tiny_suite
    gone = MU.Mutation("renamed_away", "snippet the kernel no longer has", MU.SOURCE, old="no such text", new="x")
    messages = []
    run = run_selfcheck(suite.cases[:1], suite.tolerances, 1, load_kernel(DEFAULT_KERNEL), default_device(),
                        mutations=[gone], log=messages.append)
    assert not run.met and run.kill_rate == 0.0
    assert any("renamed_away no longer applies" in p for p in run.problems())
    assert any("renamed_away no longer applies" in m for m in messages)
    assert run.correct[0].status == "PASS"


def test_variant_that_raises_is_an_error_not_a_kill(tiny_suite, monkeypatch):
    _, suite = tiny_suite
    crash = MU.Mutation("crashes", "raises at launch", MU.SOURCE,
                        old='        raise ValueError("alibi_slopes: not supported by this kernel")\n',
                        new='        raise ValueError("alibi_slopes: not supported by this kernel")\n'
                            '    raise RuntimeError("deliberate crash")\n')
    run = run_selfcheck(suite.cases[:1], suite.tolerances, 1, load_kernel(DEFAULT_KERNEL), default_device(),
                        mutations=[crash])
    (outcome,) = run.variants
    assert not outcome.caught and outcome.ratios == {} and "deliberate crash" in outcome.errors[suite.cases[0].id]
    assert not run.met
    assert run.meta()["matrix"]["crashes"] == {suite.cases[0].id: None}


def test_cli_selfcheck_writes_reports(tiny_suite, tmp_path, capsys):
    path, suite = tiny_suite
    code = main(["selfcheck", "--cases", str(path), "--filter", "q=fp8", "--seeds", "1",
                 "--variants", "q_scale_ignored", "--report-dir", str(tmp_path), "--run-id", "sc"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "kill rate: 1/1 = 100%" in out and "verdict: MET" in out and "q_scale_ignored" in out
    data = json.loads((tmp_path / "sc" / "results.json").read_text())
    sc = data["meta"]["selfcheck"]
    assert sc["kill_rate"] == 1.0 and sc["variants"][0]["caught"] and sc["correct_worst_ratio"] <= 0.5
    assert len(data["results"]) == 1 and data["results"][0]["status"] == "PASS"
    assert "Kill rate **100%**" in (tmp_path / "sc" / "report.md").read_text()
    assert "killmatrix" in (tmp_path / "sc" / "report.html").read_text()


@pytest.mark.parametrize("argv", [["--seeds", "0"], ["--variants", "no_such_variant"], ["--filter", "q=fp16"],
                                  ["--cases", "/no/such/file.yaml"]])
def test_cli_selfcheck_bad_input_exits_2(tiny_suite, tmp_path, argv):
    path, _ = tiny_suite
    args = ["selfcheck", "--cases", str(path), "--report-dir", str(tmp_path)]
    assert main(args + argv) == 2


def test_shipped_selfcheck_matrix_loads():
    suite = load_suite(ROOT / "cases" / "selfcheck.yaml")
    assert 10 <= len(suite.cases) <= 20
    paths = {c.path for c in suite.cases}
    dtypes = {(c.q_dtype, c.kv_dtype) for c in suite.cases}
    assert paths == {"2d", "3d"} and {("fp8", "fp8"), ("bf16", "fp8")} <= dtypes
    assert any(c.window > 0 for c in suite.cases) and any(c.softcap for c in suite.cases)
    assert {16, 48} <= {c.block_size for c in suite.cases}


@pytest.mark.parametrize("mutation", SOURCE_MUTATIONS, ids=lambda m: m.name)
def test_every_source_mutation_compiles_and_runs(tiny_suite, mutation):
    # A mutant that cannot run proves nothing: it would be an ERROR on every case, never a kill.
    from harness.inputs import build_inputs
    _, suite = tiny_suite
    case = suite.cases[0]
    with MU.MutantBuilder() as builder:
        variant = builder.build(mutation)
        out = _launch(variant, build_inputs(case), case)
    assert out.shape[0] == sum(q for q, _ in case.seq_lens)


def assert_same_kill_matrix(a: dict, b: dict) -> None:
    """The same variants, cases and kill verdicts, with ratios equal to 2e-3. Ratios computed in
    two processes were seen to differ in their last digits in one CI run under load (401.224
    against 401.233 for a kill, 0.40749 against 0.40774 for a near-correct case: at most 6e-4
    apart; repeated runs, alone or four at a time, agreed to the bit). The cause is not pinned
    down; the float32 reference's CPU BLAS threading is the likely one. A join or merge
    that loses or repeats a case changes the keys; one that swaps this suite's two cases moves a
    ratio by 1.1% (401.2 against 405.7) or flips a verdict."""
    assert {v: sorted(c) for v, c in a.items()} == {v: sorted(c) for v, c in b.items()}
    for variant, ratios in a.items():
        for case, ratio in ratios.items():
            other = b[variant][case]
            assert (ratio >= KILL_RATIO) == (other >= KILL_RATIO), (variant, case, ratio, other)
            assert other == pytest.approx(ratio, rel=2e-3), (variant, case, ratio, other)


def test_selfcheck_jobs_gives_the_kill_matrix_of_one_process(tmp_path):
    import subprocess

    def selfcheck(run_id, *extra):
        cmd = [sys.executable, "-m", "harness", "selfcheck", "--variants", "q_scale_ignored,k_scale_ignored",
               "--filter", "seqs=mixed,bs=48", "--seeds", "1", "--report-dir", str(tmp_path), "--run-id", run_id,
               *extra]
        subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        return json.loads((tmp_path / run_id / "results.json").read_text())["meta"]["selfcheck"]

    one, two = selfcheck("one"), selfcheck("two", "--jobs", "2")
    assert len(one["cases"]) == 2 and sorted(one["cases"]) == sorted(two["cases"])
    assert_same_kill_matrix(one["matrix"], two["matrix"])
    assert one["kill_rate"] == two["kill_rate"] == 1.0
    assert two["correct_worst_ratio"] == pytest.approx(one["correct_worst_ratio"], rel=2e-3)


def test_selfcheck_join_of_shards_run_apart_gives_the_kill_matrix_of_one_process(tmp_path):
    import subprocess
    common = ["--variants", "q_scale_ignored,k_scale_ignored", "--filter", "seqs=mixed,bs=48", "--seeds", "1",
              "--report-dir", str(tmp_path)]

    def selfcheck(run_id, *extra):
        cmd = [sys.executable, "-m", "harness", "selfcheck", *common, "--run-id", run_id, *extra]
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)

    selfcheck("one")
    selfcheck("s1", "--shard", "1/2")
    selfcheck("s2", "--shard", "2/2")
    shard_files = [str(tmp_path / s / "results.json") for s in ("s1", "s2")]
    joined = selfcheck("joined", "--join", *shard_files)
    assert joined.returncode == 0, joined.stdout + joined.stderr
    meta = lambda run_id: json.loads((tmp_path / run_id / "results.json").read_text())["meta"]["selfcheck"]  # noqa: E731
    one, both = meta("one"), meta("joined")
    assert sorted(one["cases"]) == sorted(both["cases"])
    assert_same_kill_matrix(one["matrix"], both["matrix"])
    assert both["correct_worst_ratio"] == pytest.approx(one["correct_worst_ratio"], rel=2e-3)
    # A shard missing, or given twice, is refused with exit 2 and one line naming the problem.
    missing = selfcheck("missing", "--join", shard_files[0])
    assert missing.returncode == 2 and "in no shard" in missing.stderr
    twice = selfcheck("twice", "--join", shard_files[0], shard_files[0], shard_files[1])
    assert twice.returncode == 2 and "also in" in twice.stderr
