"""Command line: python -m harness {verify,list,report,selfcheck,diff} ...

Exit codes: 0 every case passed; 1 some case failed or errored (verify --memcheck: also a memory
error); 2 bad input or usage (--memcheck without a GPU or compute-sanitizer).
selfcheck: 0 the bar is met (every broken variant caught, the correct kernel clean), 1 not met.
diff: 0 no regression, 1 a case flipped to FAIL/ERROR or its error grew beyond the factor.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from harness import STARTED as IMPORTS_STARTED
from harness.schema import Result

ROOT = Path(__file__).resolve().parent.parent
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
# Cases judged at once by one process on a GPU (harness.runner explains why threads pay there).
DEFAULT_GPU_THREADS = 2


class UsageError(Exception):
    """Bad input found after argument parsing: one line, exit 2."""


def _gpu_available() -> bool:
    import torch
    return torch.cuda.is_available()


def default_cases() -> Path:
    return ROOT / "cases" / ("default.yaml" if _gpu_available() else "smoke.yaml")


def git_commit() -> str:
    """HEAD's hash (-dirty with uncommitted changes); HARNESS_COMMIT names it where there is no .git."""
    if os.environ.get("HARNESS_COMMIT"):
        return os.environ["HARNESS_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _parse_shard(text: str):
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard {text!r}: expected K/N, e.g. 1/4") from None
    return k, n


def select_cases(args, multiply_by_seeds: bool = True):
    """Load, filter and shard the cases the arguments ask for; with multiply_by_seeds, run each
    with --seeds seeds (selfcheck gives its seeds to the correct kernel alone)."""
    from harness.matrix import filter_cases, load_suite, seeded, select_ids, shard
    if args.seeds < 1:
        raise UsageError(f"--seeds {args.seeds}: must be >= 1")
    if args.shard and (getattr(args, "jobs", None) or 1) > 1:
        raise UsageError("--jobs and --shard: pick one (--jobs shards the run itself)")
    suite = load_suite(args.cases or default_cases())
    cases = select_ids(suite.cases, args.case, suite.path) if args.case else list(suite.cases)
    cases = filter_cases(cases, args.filter) if args.filter else cases
    only_ids = getattr(args, "case_ids", None)
    if args.shard and not only_ids:
        cases = shard(cases, *_parse_shard(args.shard))
    if multiply_by_seeds and args.seeds > 1:
        cases = [seeded(c, i) for c in cases for i in range(args.seeds)]
    if only_ids:  # a worker taking over part of a run: the ids it was given (seeds applied), then its shard
        wanted = set(json.loads(Path(only_ids).read_text()))
        cases = [c for c in cases if c.id in wanted]
        if args.shard:
            cases = shard(cases, *_parse_shard(args.shard))
    if not cases:
        raise UsageError(f"no case of {suite.path} matches --filter {args.filter!r}")
    return suite, cases


def _shown_path(path) -> str:
    """A path relative to the repository when it lies inside it, as reports should show it."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(path)


def run_meta(args, suite, kernel_spec: str, started: str) -> dict:
    import torch
    import triton
    from harness.runner import device_name
    return {
        "commit": git_commit(), "kernel": kernel_spec, "device": device_name(),
        "mode": "gpu" if torch.cuda.is_available() else "interpreter",
        "torch": torch.__version__, "triton": triton.__version__,
        "cases_file": _shown_path(suite.path),
        "filter": args.filter, "seeds": args.seeds, "shard": args.shard, "started": started,
        "tolerances": suite.tolerances.as_dict(),
    }


def bench_plot_b64(path) -> str:
    """A benchmark plot (make bench's PNG) as base64, for the HTML report to embed."""
    import base64
    data = Path(path).read_bytes() if Path(path).is_file() else b""
    if not data.startswith(b"\x89PNG"):
        raise UsageError(f"--bench-plot {path}: not a PNG file")
    return base64.b64encode(data).decode("ascii")


def phase_totals(results) -> dict:
    """Seconds spent per phase over all cases; compile = first launch minus the second, warm one."""
    total = {"inputs": 0.0, "compile": 0.0, "kernel": 0.0, "reference": 0.0}
    for r in results:
        t = r.timings
        total["inputs"] += t.get("inputs", 0.0)
        first, warm = t.get("kernel_first", 0.0), t.get("kernel", 0.0)
        compile_s = max(0.0, first - warm)
        total["compile"] += compile_s
        total["kernel"] += warm + first - compile_s  # both launches, less compilation
        total["reference"] += t.get("reference", 0.0)
    return total


def cmd_verify(args) -> int:
    from harness.reports import render_terminal, summarize, write_reports
    from harness.kernels import load_kernel
    from harness.runner import DEFAULT_KERNEL, default_device, device_name, run_cases
    started_at = time.perf_counter()
    start_up = started_at - IMPORTS_STARTED  # python's imports (torch, triton, pandas) before verify began
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    kernel_spec = args.kernel or DEFAULT_KERNEL
    suite, cases = select_cases(args)
    threads = case_threads(args)
    sanitizer = memcheck_sanitizer() if args.memcheck else None
    bench_png = bench_plot_b64(args.bench_plot) if args.bench_plot else None  # refuse a bad path first
    try:
        kernel = load_kernel(kernel_spec)
    except ValueError as e:
        raise UsageError(str(e)) from None
    mode = "GPU" if _gpu_available() else "CPU: Triton interpreter (no GPU found), smaller matrix"
    print(f"verify: {len(cases)} cases of {suite.path} with {kernel_spec} on {device_name()} [{mode}]", flush=True)

    run_id = args.run_id or dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    report_root = Path(args.report_dir)
    report_root.mkdir(parents=True, exist_ok=True)
    jsonl = report_root / f"{run_id}.jsonl"
    meta = run_meta(args, suite, kernel_spec, started)
    if bench_png:
        meta["bench_png_b64"] = bench_png
    if sanitizer:
        from harness.memcheck import DEFAULT_JOBS, run_under_memcheck
        jobs = args.jobs or DEFAULT_JOBS
        print(f"  memcheck: each case in a process of its own under {sanitizer}, {jobs} at a time", flush=True)
        results = run_under_memcheck(worker_args(args), cases, report_root / f"{run_id}.memcheck", jobs, sanitizer)
        meta["jobs"] = f"a process per case under compute-sanitizer's memcheck, {jobs} at a time"
        meta["timing"] = phase_totals(results)
    elif args.jobs and args.jobs > 1:
        from harness.merge import run_workers
        print(f"  {args.jobs} worker processes share the device", flush=True)
        shards_dir = report_root / f"{run_id}.shards"
        results, shard_meta, missing = run_workers(worker_args(args), args.jobs, shards_dir, cases)
        results = _in_order(results + run_isolated_cases(args, cases, missing, shards_dir), cases)
        results = rerun_out_of_memory(results, cases, suite.tolerances, kernel)
        meta["timing"] = shard_meta.get("timing", {})
        meta["jobs"] = f"{args.jobs} worker processes"
    else:
        results, meta["jobs"], meta["compiled_variants"] = run_one_process(
            args, cases, suite, kernel, jsonl, report_root / f"{run_id}.shards", threads)
        meta["timing"] = phase_totals(results)
    # Workers' own start-ups ran beside this process's run: its start-up is the command's.
    meta["timing"] = {"start-up": start_up, **{k: v for k, v in meta["timing"].items() if k != "start-up"}}
    # The reports show their own time and the command's wall time until they were rendered.
    out_dir = write_reports(report_root / run_id, results, meta, started_at=IMPORTS_STARTED)
    print(render_terminal(results, meta, color=sys.stdout.isatty()))
    print(f"reports: {out_dir}/ (report.html, report.md, results.json, junit.xml); {report_root / 'latest'}")
    jsonl.unlink(missing_ok=True)  # the complete results now live in results.json
    if not results and args.claim_dir:
        return EXIT_OK  # a worker that found every variant group taken by the others
    return EXIT_OK if summarize(results)["verdict"] == "PASS" else EXIT_FAILED


def memcheck_sanitizer() -> str:
    """compute-sanitizer's path for --memcheck, or a UsageError saying what is missing."""
    from harness.memcheck import find_sanitizer
    if not _gpu_available():
        raise UsageError("--memcheck: needs a GPU (memcheck watches device code; the interpreter runs none)")
    sanitizer = find_sanitizer()
    if not sanitizer:
        raise UsageError("--memcheck: compute-sanitizer not found (PATH, CUDA_HOME/bin, /usr/local/cuda/bin; "
                         "or set HARNESS_SANITIZER)")
    return sanitizer


def run_one_process(args, cases, suite, kernel, jsonl, workers_dir, threads: int = 1) -> tuple:
    """(results in input order, how the run went, compiled variants or None): the cases in this
    process, grouped by compiled variant; without --jobs, on a GPU, the cases left go to worker
    processes once compiling proves slow (a cold Triton cache), and after a case that lost the
    device, to fresh processes one at a time. The variants are counted only where no worker ran:
    workers compile in processes of their own."""
    from harness import runner
    from harness.cold_cache import ColdCacheWatch, claimed_groups, default_workers, group_by_variant
    from harness.merge import run_workers
    from harness.runner import compiled_variants, default_device, lost_the_device, run_cases
    claim_dir = getattr(args, "claim_dir", None)
    if claim_dir:  # a worker: variant groups one at a time, from the list every worker walks
        results = []
        for group in claimed_groups(cases, Path(claim_dir)):
            ran = run_cases(group, suite.tolerances, kernel, default_device(), jsonl_path=jsonl,
                            progress=False, threads=threads)
            results += ran
            if any(lost_the_device(r) for r in ran):
                break  # this process's device is gone: the cases it leaves run elsewhere
        return _in_order(results, cases), "1 worker process", None
    ordered = group_by_variant(cases)
    # A worker (runner.SHARED_DEVICE) never starts workers of its own.
    watch = ColdCacheWatch(ordered, enabled=args.jobs is None and _gpu_available() and not runner.SHARED_DEVICE)
    results = run_cases(ordered, suite.tolerances, kernel, default_device(), jsonl_path=jsonl,
                        progress=args.progress, stop_after=watch, threads=threads)
    how = "1 process" + (f", {threads} threads" if threads > 1 else "")
    variants = compiled_variants(kernel)
    if any(lost_the_device(r) for r in results):
        if runner.SHARED_DEVICE:
            return _in_order(results, cases), how, variants  # a worker: its parent runs what it left
        results = rerun_after_lost_device(args, results, cases, threads, workers_dir)
        return _in_order(results, cases), how + ", then fresh processes one at a time (a case lost the device)", None
    done = {r.id for r in results}
    left = [c for c in ordered if c.id not in done]
    if left:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the workers need the device memory this process cached
        jobs = default_workers()
        print(f"  compiling is slow (cold Triton cache): {jobs} worker processes take the {len(left)} "
              f"cases left", flush=True)
        workers_dir.mkdir(parents=True, exist_ok=True)
        ids_file = workers_dir / "case_ids.json"
        ids_file.write_text(json.dumps([c.id for c in left]))
        more, _, missing = run_workers(worker_args(args) + ["--case-ids", str(ids_file)], jobs, workers_dir, left)
        results = results + more + run_isolated_cases(args, cases, missing, workers_dir)
        how = f"1 process, then {jobs} worker processes (cold Triton cache)"
        variants = None
    if threads > 1 or left:  # cases ran beside others: those out of memory run again, one at a time
        results = rerun_out_of_memory(results, ordered, suite.tolerances, kernel)
    return _in_order(results, cases), how, variants


def run_isolated_cases(args, cases, missing, workers_dir, why="left by a worker that lost its device or died") -> list:
    """The cases a process left unfinished, in fresh processes one at a time (merge.run_isolated)."""
    if not missing:
        return []
    from harness.merge import run_isolated
    wanted = {c.id for c in missing}
    print(f"  {len(missing)} case(s) {why}: running them in fresh processes, one at a time", flush=True)
    return run_isolated(worker_args(args), workers_dir / "isolated", [c for c in cases if c.id in wanted])


def rerun_after_lost_device(args, results, cases, threads, workers_dir) -> list:
    """This process lost its device (an illegal address, say: its CUDA context fails every later
    call), so the cases it did not finish run in fresh processes, one at a time. With one thread the
    case that lost it is known and keeps its row; with several, every case that reported the loss
    runs again, and if none of them loses the device again alone, they stay ERROR rows: a fault
    that does not repeat is still a fault. Cases out of memory beside others run again there too."""
    from harness.runner import lost_the_device
    lost = [r for r in results if lost_the_device(r)]
    suspects = {r.id: r for r in lost} if threads > 1 else {}
    again_ids = set(suspects) | {r.id for r in results if r.status == "ERROR" and "OutOfMemoryError" in r.message}
    keep = [r for r in results if r.id not in again_ids]
    done = {r.id for r in keep}
    rest = [c for c in cases if c.id not in done]
    print(f"  {lost[0].id} lost the device ({lost[0].message})", flush=True)
    again = run_isolated_cases(args, cases, rest, workers_dir, why="left")
    if suspects and not any(lost_the_device(r) for r in again if r.id in suspects):
        again = [Result(id=r.id, status="ERROR", axes=r.axes, timings=r.timings,
                        message=f"the device was lost while this case ran beside another "
                                f"({suspects[r.id].message}); alone it was not: a fault that does not repeat")
                 if r.id in suspects else r for r in again]
    return keep + again


def _in_order(results, cases) -> list:
    rank = {c.id: i for i, c in enumerate(cases)}
    return sorted(results, key=lambda r: rank[r.id])


def case_threads(args) -> int:
    """Cases judged at once in this process: --threads, else DEFAULT_GPU_THREADS on a GPU (a worker
    process, which already shares the device with others, and the CPU interpreter take one)."""
    from harness import runner
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads {args.threads}: must be >= 1")
        return args.threads
    return DEFAULT_GPU_THREADS if _gpu_available() and not runner.SHARED_DEVICE else 1


def rerun_out_of_memory(results, cases, tolerances, kernel) -> list:
    """Cases that ran out of device memory beside others (worker processes or threads) run again
    here, one at a time."""
    from harness.runner import default_device, run_cases
    oom = {r.id for r in results if r.status == "ERROR" and "OutOfMemoryError" in r.message}
    if not oom:
        return results
    print(f"  {len(oom)} case(s) ran out of memory beside other cases: running them again alone", flush=True)
    again = {r.id: r for r in run_cases([c for c in cases if c.id in oom], tolerances, kernel, default_device(),
                                        progress=False)}
    return [again.get(r.id, r) for r in results]


def worker_args(args) -> list:
    """The arguments a worker process repeats (it adds its own --shard and report folder)."""
    argv = ["--seeds", str(args.seeds)]
    for flag in ("cases", "filter", "kernel", "variants"):
        value = getattr(args, flag, None)
        if value:
            argv += [f"--{flag}", str(value)]
    for case in getattr(args, "case", None) or ():
        argv += ["--case", case]
    return argv


def cmd_merge(args) -> int:
    from harness.merge import merge_runs
    from harness.reports import load_results_json, render_terminal, summarize, write_reports
    runs = []
    for path in args.results:
        if not Path(path).is_file():
            raise UsageError(f"{path}: no such results file")
        runs.append(load_results_json(path))
    try:
        results, meta = merge_runs(runs)
    except ValueError as e:
        raise UsageError(str(e)) from None
    out_dir = write_reports(Path(args.out), results, meta)
    print(render_terminal(results, meta))
    print(f"reports: {out_dir}/")
    return EXIT_OK if summarize(results)["verdict"] == "PASS" else EXIT_FAILED


def cmd_list(args) -> int:
    suite, cases = select_cases(args)
    for c in cases:
        print(c.id)
    print(f"{len(cases)} cases from {suite.path}", file=sys.stderr)
    return EXIT_OK


def cmd_report(args) -> int:
    from harness.reports import load_results_json, render_terminal, write_reports
    src = Path(args.results)
    if not src.is_file():
        raise UsageError(f"{src}: no such results file")
    results, meta = load_results_json(src)
    if args.bench_plot:
        meta["bench_png_b64"] = bench_plot_b64(args.bench_plot)
    out_dir = Path(args.out) if args.out else src.resolve().parent  # the run folder, not the latest link
    write_reports(out_dir, results, meta)
    print(render_terminal(results, meta))
    print(f"reports: {out_dir}/")
    return EXIT_OK


def load_selfcheck_shards(paths, cases, seeds: int) -> list:
    """(results, meta) of each self-check shard; refuses files that are no self-check of these
    cases and seeds, and a set of shards that misses or repeats a case."""
    from harness.reports import load_results_json
    shards, seen = [], {}
    wanted = {c.id for c in cases}
    for path in paths:
        if not Path(path).is_file():
            raise UsageError(f"--join {path}: no such results file")
        results, meta = load_results_json(path)
        info = meta.get("selfcheck") or {}
        if not info or info.get("seeds") != seeds:
            raise UsageError(f"--join {path}: not a self-check run with --seeds {seeds}")
        ids = set(info.get("cases") or [])
        if not ids <= wanted:
            raise UsageError(f"--join {path}: holds cases outside the selected matrix, e.g. {sorted(ids - wanted)[0]}")
        for i in ids:
            if i in seen:
                raise UsageError(f"--join {path}: case {i} also in {seen[i]}")
            seen[i] = path
        shards.append((results, meta))
    if set(seen) != wanted:
        raise UsageError(f"--join: {len(wanted - set(seen))} case(s) of the matrix in no shard, "
                         f"e.g. {sorted(wanted - set(seen))[0]}")
    return shards


def cmd_selfcheck(args) -> int:
    from harness.mutants import CATALOGUE, find
    from harness.reports import write_reports
    from harness.kernels import load_kernel
    from harness.runner import DEFAULT_KERNEL, default_device, device_name
    from harness.selfcheck import render_kill_matrix, render_summary, run_selfcheck, stderr_log
    started_at = time.perf_counter()
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    suite, cases = select_cases(args, multiply_by_seeds=False)
    mutations = CATALOGUE
    if args.variants:
        try:
            mutations = find([n.strip() for n in args.variants.split(",") if n.strip()])
        except ValueError as e:
            raise UsageError(f"--variants: {e}") from None
        if not mutations:
            raise UsageError(f"--variants {args.variants!r}: names no variant")
    kernel = load_kernel(DEFAULT_KERNEL)
    mode = "GPU" if _gpu_available() else "CPU: Triton interpreter"
    print(f"selfcheck: {len(cases)} cases of {suite.path} on {device_name()} [{mode}]; correct kernel "
          f"over {args.seeds} seeds", flush=True)

    run_id = args.run_id or "selfcheck-" + dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    if args.join:
        from harness.selfcheck import run_from_shards
        run = run_from_shards(load_selfcheck_shards(args.join, cases, args.seeds), cases, args.seeds, mutations)
    elif args.jobs > 1:
        from harness.merge import run_shards
        from harness.selfcheck import run_from_shards
        print(f"  {args.jobs} worker processes share the device", flush=True)
        shards = run_shards("selfcheck", worker_args(args), args.jobs, Path(args.report_dir) / f"{run_id}.shards")
        run = run_from_shards([r for r in shards if r[1]], cases, args.seeds, mutations)
    else:
        run = run_selfcheck(cases, suite.tolerances, args.seeds, kernel, default_device(), mutations=mutations,
                            log=stderr_log)

    meta = run_meta(args, suite, DEFAULT_KERNEL, started)
    meta["timing"] = dict(run.timing)
    meta["wall_s"] = time.perf_counter() - started_at
    meta["selfcheck"] = run.meta()
    out_dir = write_reports(Path(args.report_dir) / run_id, run.correct, meta)
    print(render_kill_matrix(run))
    print()
    print(render_summary(run))
    phases = ", ".join(f"{name} {secs:.0f} s" for name, secs in run.timing.items())
    print(f"wall time {meta['wall_s']:.0f} s ({phases}); reports: {out_dir}/")
    return EXIT_OK if run.met else EXIT_FAILED


def cmd_diff(args) -> int:
    from harness.diff import DiffInputError, diff_files, render_markdown, render_terminal
    if not args.growth > 1:
        raise UsageError(f"--growth {args.growth}: must be > 1")
    try:
        d, base_label, new_label = diff_files(args.base, args.new, args.growth)
    except DiffInputError as e:
        raise UsageError(str(e)) from None
    print(render_terminal(d, base_label, new_label), end="")
    if args.markdown:
        Path(args.markdown).write_text(render_markdown(d, base_label, new_label), encoding="utf-8")
        print(f"markdown: {args.markdown}")
    return EXIT_FAILED if d.regressed else EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m harness", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def case_args(sp):
        sp.add_argument("--cases", help="case matrix YAML (default: cases/default.yaml on a GPU, "
                                        "cases/smoke.yaml under the CPU interpreter)")
        sp.add_argument("--filter", help="axis=value[,axis=value...] or a substring of the case id")
        sp.add_argument("--case", action="append", metavar="ID",
                        help="only the case with exactly this id (repeatable), e.g. one a report shows failing")
        sp.add_argument("--seeds", type=int, default=1, help="run every case with N seeds (seed, seed+1, ...)")
        sp.add_argument("--shard", help="K/N: run the K-th of N deterministic slices of the matrix")

    v = sub.add_parser("verify", help="run kernel and reference on every case and write reports")
    case_args(v)
    v.add_argument("--kernel", help="MODULE:FUNCTION or FILE.py:FUNCTION with vLLM's unified_attention keywords "
                                    "(default: kernel:unified_attention)")
    v.add_argument("--report-dir", default=str(ROOT / "reports"), help="where reports/<run-id>/ goes")
    v.add_argument("--run-id", help="name of the report folder (default: the start time)")
    v.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")
    v.add_argument("--jobs", type=int, default=None,
                   help="N worker processes, each judging a shard of the cases on the shared device "
                        "(default: one process; on a GPU, once compiling proves slow, worker processes "
                        "take the cases left)")
    v.add_argument("--threads", type=int, default=None,
                   help="cases judged at once in one process, each thread on its own CUDA stream "
                        "(default: %d on a GPU, 1 under the CPU interpreter and in worker processes)"
                        % DEFAULT_GPU_THREADS)
    v.add_argument("--memcheck", action="store_true",
                   help="GPU: run each case in a process of its own under compute-sanitizer's memcheck "
                        "(--jobs at a time, default 8); an out-of-bounds access is the case's ERROR")
    v.add_argument("--case-ids", help=argparse.SUPPRESS)  # a worker's share: a JSON list of case ids
    v.add_argument("--claim-dir", help=argparse.SUPPRESS)  # a worker: take variant groups via claim files here
    v.add_argument("--bench-plot", help="embed this benchmark plot (make bench's PNG) in the HTML report")
    v.set_defaults(fn=cmd_verify)

    mg = sub.add_parser("merge", help="join shard results.json files into one report")
    mg.add_argument("results", nargs="+", help="results.json of each shard")
    mg.add_argument("--out", required=True, help="folder to write the merged reports into")
    mg.set_defaults(fn=cmd_merge)

    ls = sub.add_parser("list", help="print the expanded case ids")
    case_args(ls)
    ls.set_defaults(fn=cmd_list)

    r = sub.add_parser("report", help="re-render every report format from a results.json")
    r.add_argument("results", help="path to a results.json")
    r.add_argument("--out", help="folder to write into (default: the results file's folder)")
    r.add_argument("--bench-plot", help="embed this benchmark plot (make bench's PNG) in the HTML report")
    r.set_defaults(fn=cmd_report)

    sc = sub.add_parser("selfcheck", help="run known-bad kernel variants and the correct kernel: "
                                          "does every check catch its bug?")
    sc.add_argument("--cases", default=str(ROOT / "cases" / "selfcheck.yaml"),
                    help="case matrix YAML (default: cases/selfcheck.yaml)")
    sc.add_argument("--filter", help="axis=value[,axis=value...] or a substring of the case id")
    sc.add_argument("--case", action="append", metavar="ID", help="only the case with exactly this id (repeatable)")
    sc.add_argument("--seeds", type=int, default=10, help="seeds for the correct kernel (default 10)")
    sc.add_argument("--variants", help="NAME[,NAME...]: only these variants of harness/mutants.py (default: all)")
    sc.add_argument("--report-dir", default=str(ROOT / "reports"), help="where reports/<run-id>/ goes")
    sc.add_argument("--run-id", help="name of the report folder (default: selfcheck-<start time>)")
    sc.add_argument("--shard", help="K/N: run the K-th of N deterministic slices of the cases")
    sc.add_argument("--jobs", type=int, default=1,
                    help="worker processes sharing the device, each on a slice of the cases")
    sc.add_argument("--join", nargs="+", metavar="RESULTS_JSON",
                    help="run nothing: join the results.json of self-check shards run elsewhere "
                         "(--shard K/N each, same --cases and --seeds) into one self-check")
    sc.set_defaults(fn=cmd_selfcheck)

    df = sub.add_parser("diff", help="compare two results.json files: flips, new errors, error growth")
    df.add_argument("base", help="results.json of the base run")
    df.add_argument("new", help="results.json of the new run")
    df.add_argument("--growth", type=float, default=2.0,
                    help="flag a case whose max_abs_err or tol_ratio grew by this factor or more (default 2)")
    df.add_argument("--markdown", help="also write the comparison as markdown here (e.g. for a CI job summary)")
    df.set_defaults(fn=cmd_diff)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from harness.matrix import MatrixError
    try:
        return args.fn(args)
    except (MatrixError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
