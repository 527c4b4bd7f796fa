"""Load a YAML case matrix, validate it strictly and expand it into harness.schema.Case records.

Every problem is refused before anything runs, as a MatrixError whose str is one line naming the
file, the place (block, include/exclude/override entry, case) and the field, e.g.

    cases/x.yaml: matrix[2] (fp8_scales): field 'block_size': 20 is not a multiple of 8

Matrix file format (cases/*.yaml; cases/smoke.yaml repeats this at its top)::

    tolerances: tolerances.yaml   # path relative to this file (default: tolerances.yaml beside it)
    sequences:                    # named sequence mixes: lists of [query_len, kv_len]
      decode: [[1, 40], [1, 97], [1, 300]]
      mixed:  [[1, 40], [5, 18], [17, 70]]
    defaults:                     # axis values for every block unless the block sets them
      out_dtype: bf16
    matrix:                       # list of blocks; each expands as the cartesian product of its axes
      - name: fp8_scales          # optional, informative (shows up in error messages)
        dtypes: [[fp8, fp8], [bf16, fp8]]       # or separate q_dtype / kv_dtype axes (not both)
        scales: [[0.75, 0.5, 0.25], [1.0, 1.0, 1.0]]
        heads: [[8, 2], [4, 4]]
        head_size: 128
        block_size: [16, 48]
        seqs: [decode, mixed]
        exclude: [{dtypes: [bf16, fp8], block_size: 48}]    # drop cases matching ALL given keys
        include: [{dtypes: [fp16, fp8], block_size: 32}]    # extra cases: the entry's values
                                                             # replace the block's, then expand
        override: [{match: {head_size: 256}, set: {num_blocks: 512}}]  # in order, on every case

An axis is a value or a list of values. For axes whose value is itself a list (scales, heads,
dtypes) a list of lists means several values. In exclude/include/override entries every axis
takes a single value. An exclude or override entry that matches no case is an error (typo guard).

Axes (names = Case fields):
    q_dtype, kv_dtype   fp8 | bf16 | fp16; supported (q, kv): fp8/fp8, bf16/fp8, fp16/fp8,
                        bf16/bf16, fp16/fp16
    dtypes              [q, kv] pairs, instead of q_dtype/kv_dtype
    out_dtype           bf16 | fp16
    scales              [q, k, v] positive floats; required when q or kv is fp8, ignored otherwise
    scale_layout        tensor | per_seq_head                          (default tensor)
    heads               [num_q_heads, num_kv_heads], q a multiple of kv
    head_size           int, 32..256
    block_size          positive multiple of 8
    num_blocks          int; omitted/null: blocks the sequences need + 25% spare (at least 4)
    seqs                name of a mix in `sequences`
    window              tokens >= 1, or -1/null for none                (default -1)
    softcap             float >= 0, 0/null for none                     (default 0)
    causal              bool                                            (default true)
    path                2d | 3d                                         (default 2d)
    layout              contiguous | strided | shared_blocks | exact_table  (default contiguous;
                        strided: non-contiguous q/out/block table, cache rows padded past head_size)
    seed                int >= 0                                        (default 0)

Cases without an fp8 tensor get scales 1/1/1 and scale_layout tensor (scales have no effect
there), so such cases differing only in scales collapse into one. Cases with the same id are
merged silently.

Tolerance file format (cases/tolerances.yaml)::

    rules: [tolerance, adaptive]                  # rules that decide the verdict; all must pass
    adaptive: {mult: 2.0, atol: 1.0e-3, mean_mult: 2.0}
    dtypes:                                       # key q/kv/out, for every pair the cases use
      fp8/fp8/bf16: {atol: 4.0e-3, rtol: 8.0e-3, mean_atol: 1.0e-3}

Public API: MatrixError, Suite, Tolerances, load_suite, load_tolerances, filter_cases, shard.
"""
from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Optional

import yaml

from harness.schema import AXES, DTYPES, LAYOUTS, OUT_DTYPES, PATHS, SCALE_LAYOUTS, Case

SUPPORTED_PAIRS = (("fp8", "fp8"), ("bf16", "fp8"), ("fp16", "fp8"), ("bf16", "bf16"), ("fp16", "fp16"))
RULES = ("tolerance", "adaptive")
TOP_KEYS = ("tolerances", "sequences", "defaults", "matrix")
BLOCK_KEYS = ("name", "exclude", "include", "override")
# Canonical expansion order; "dtypes" stands for the (q_dtype, kv_dtype) pair.
_EXPAND_AXES = ("dtypes",) + tuple(a for a in AXES if a not in ("q_dtype", "kv_dtype"))
_OPTIONAL = {"scale_layout": "tensor", "num_blocks": None, "window": -1, "softcap": 0.0,
             "causal": True, "path": "2d", "layout": "contiguous", "seed": 0}
_TOL_FIELDS = ("atol", "rtol", "mean_atol")
_ADAPTIVE_FIELDS = ("mult", "atol", "mean_mult")
# Short names accepted by filter_cases, the same as in case ids.
_FILTER_ALIASES = {"q": "q_dtype", "kv": "kv_dtype", "out": "out_dtype", "gqa": "heads",
                   "d": "head_size", "bs": "block_size", "nb": "num_blocks", "win": "window"}


class MatrixError(Exception):
    """A refused matrix or tolerance file, filter or shard request; str() is one line."""

    def __init__(self, file: Optional[str], where: Optional[str], field: Optional[str], message: str):
        self.file = file
        self.where = where
        self.field = field
        self.message = message
        parts = [p for p in (file, where) if p]
        if field:
            parts.append(f"field '{field}'")
        parts.append(message)
        super().__init__(re.sub(r"\s*[\r\n]+\s*", " ", ": ".join(parts)))  # one line, always

    def __reduce__(self):   # picklable across worker processes despite the 4-argument init
        return (MatrixError, (self.file, self.where, self.field, self.message))


class _Bad(Exception):
    """A value problem raised by a parser; the caller adds file and location."""


@dataclass
class Tolerances:
    rules: list                                   # rule names that decide the verdict
    by_dtype: dict                                # "q/kv/out" -> {atol, rtol, mean_atol}
    adaptive: dict                                # {mult, atol, mean_mult}
    path: str = ""                                # file they came from, for messages

    def for_case(self, case: Case) -> dict:
        try:
            return dict(self.by_dtype[case.dtype_key])
        except KeyError:
            raise MatrixError(self.path or None, "dtypes", case.dtype_key,
                              f"no tolerance entry (needed by case {case.id})") from None

    def as_dict(self) -> dict:
        return {"rules": list(self.rules), "adaptive": dict(self.adaptive),
                "dtypes": {k: dict(v) for k, v in self.by_dtype.items()}}


@dataclass
class Suite:
    path: str
    cases: list                                   # [Case], expansion order, unique ids
    tolerances: Tolerances


# ----------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads 1e-3 as a float (YAML 1.2) and refuses duplicate mapping keys."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value != "<<":
                if key_node.value in seen:
                    raise _DuplicateKey(key_node.value, key_node.start_mark)
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(Exception):
    def __init__(self, key, mark):
        super().__init__(key)
        self.key, self.mark = key, mark


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _read_yaml(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise MatrixError(path, None, None, f"cannot read file ({e.__class__.__name__}: {e})") from None
    loader = _Loader(text)
    try:
        return loader.get_single_data()
    except _DuplicateKey as e:
        raise MatrixError(path, f"line {e.mark.line + 1}", e.key, "duplicate key") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else None
        problem = e.problem or e.context or "invalid YAML"
        raise MatrixError(path, where, None, f"YAML syntax error: {problem}") from None
    except yaml.YAMLError as e:
        raise MatrixError(path, None, None, f"YAML syntax error: {e}") from None
    finally:
        loader.dispose()


# ----------------------------------------------------------------------------- values


def _show(v: Any) -> str:
    s = repr(v) if isinstance(v, str) else str(v)
    if isinstance(v, bool):
        s = str(v).lower()
    return s if len(s) <= 60 else s[:57] + "..."


def _fmt(x: float) -> str:
    """Short exact number text for ids: 0.75, 1, 30; repr when %g would lose digits."""
    g = f"{x:g}"
    return g if float(g) == x else repr(float(x))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(v, lo=None, hi=None) -> int:
    if not _is_int(v):
        raise _Bad(f"{_show(v)} is not an integer")
    if lo is not None and v < lo:
        raise _Bad(f"{v} is below {lo}")
    if hi is not None and v > hi:
        raise _Bad(f"{v} is above {hi}")
    return v


def _choice(options):
    def parse(v):
        if not isinstance(v, str) or v not in options:
            raise _Bad(f"{_show(v)} is not one of {', '.join(options)}")
        return v
    return parse


def _p_dtypes(v):
    if not isinstance(v, list) or len(v) != 2:
        raise _Bad(f"{_show(v)} is not a [q_dtype, kv_dtype] pair")
    q, kv = (_choice(DTYPES)(x) for x in v)
    if (q, kv) not in SUPPORTED_PAIRS:
        raise _Bad(f"q {q} with kv {kv} is not a supported pair ({_pairs_text()})")
    return (q, kv)


def _p_scales(v):
    if not isinstance(v, list) or len(v) != 3:
        raise _Bad(f"{_show(v)} is not a [q, k, v] list of 3 scales")
    for x in v:
        if not _is_num(x):
            raise _Bad(f"{_show(x)} in {_show(v)} is not a number")
        if not math.isfinite(x) or x <= 0:
            raise _Bad(f"{_show(x)} in {_show(v)} is not a positive finite number")
    return tuple(float(x) for x in v)


def _p_heads(v):
    if not isinstance(v, list) or len(v) != 2:
        raise _Bad(f"{_show(v)} is not a [num_q_heads, num_kv_heads] pair")
    for x in v:
        if not _is_int(x) or x < 1:
            raise _Bad(f"{_show(x)} in {_show(v)} is not a positive integer")
    if v[0] % v[1]:
        raise _Bad(f"{_show(v)}: {v[0]} query heads are not a multiple of {v[1]} kv heads")
    return (v[0], v[1])


def _p_block_size(v):
    _int(v, lo=1)
    if v % 8:
        raise _Bad(f"{v} is not a multiple of 8")
    return v


def _p_num_blocks(v):
    return None if v is None else _int(v, lo=1)


def _p_window(v):
    if v is None:
        return -1
    _int(v)
    if v != -1 and v < 1:
        raise _Bad(f"{v} is not a window (tokens >= 1, or -1/null for none)")
    return v


def _p_softcap(v):
    if v is None:
        return 0.0
    if not _is_num(v) or not math.isfinite(v) or v < 0:
        raise _Bad(f"{_show(v)} is not a number >= 0")
    return float(v)


def _p_causal(v):
    if not isinstance(v, bool):
        raise _Bad(f"{_show(v)} is not a boolean (true/false)")
    return v


def _pairs_text():
    return ", ".join(f"{q}/{kv}" for q, kv in SUPPORTED_PAIRS)


def _parsers(sequences: dict) -> dict:
    def p_seqs(v):
        if not isinstance(v, str):
            raise _Bad(f"{_show(v)} is not a sequence mix name")
        if v not in sequences:
            known = ", ".join(sequences) or "none defined"
            raise _Bad(f"{_show(v)} is not a sequence mix (known: {known})")
        return v

    return {
        "dtypes": _p_dtypes,
        "q_dtype": _choice(DTYPES),
        "kv_dtype": _choice(DTYPES),
        "out_dtype": _choice(OUT_DTYPES),
        "scales": _p_scales,
        "scale_layout": _choice(SCALE_LAYOUTS),
        "heads": _p_heads,
        "head_size": lambda v: _int(v, 32, 256),
        "block_size": _p_block_size,
        "num_blocks": _p_num_blocks,
        "seqs": p_seqs,
        "window": _p_window,
        "softcap": _p_softcap,
        "causal": _p_causal,
        "path": _choice(PATHS),
        "layout": _choice(LAYOUTS),
        "seed": lambda v: _int(v, lo=0),
    }


_LIST_VALUED = ("dtypes", "scales", "heads")   # one value of these is itself a list


# ----------------------------------------------------------------------------- expansion


class _Ctx:
    """File being expanded: its display path, parsers and sequence mixes."""

    def __init__(self, path: str, sequences: dict):
        self.path = path
        self.sequences = sequences
        self.parsers = _parsers(sequences)

    def err(self, where, field, message):
        return MatrixError(self.path, where, field, message)

    def values(self, axis, raw, where, single):
        """The list of parsed values an axis entry stands for."""
        parse = self.parsers[axis]
        if axis in _LIST_VALUED:
            multi = isinstance(raw, list) and bool(raw) and all(isinstance(x, list) for x in raw)
            if isinstance(raw, list) and not multi and any(isinstance(x, list) for x in raw):
                raise self.err(where, axis, f"{_show(raw)} mixes values and lists of values")
        else:
            multi = isinstance(raw, list)
        if isinstance(raw, list) and not raw:
            raise self.err(where, axis, "empty list")
        if multi and single:
            raise self.err(where, axis, f"{_show(raw)}: takes a single value here")
        out = []
        for item in (raw if multi else [raw]):
            try:
                v = parse(item)
            except _Bad as e:
                raise self.err(where, axis, str(e)) from None
            if v not in out:
                out.append(v)
        return out

    def layer(self, raw: dict, where: str, single: bool, extra=()) -> dict:
        """Axis entries of a defaults/block/include/match/set mapping -> {axis: [values]}."""
        if not isinstance(raw, dict):
            raise self.err(where, None, f"{_show(raw)} is not a mapping")
        allowed = set(self.parsers) | set(extra)
        for k in raw:
            if k not in allowed:
                raise self.err(where, str(k), "unknown axis"
                               f" (axes: dtypes, {', '.join(AXES)})")
        if "dtypes" in raw and ("q_dtype" in raw or "kv_dtype" in raw):
            raise self.err(where, "dtypes", "give either 'dtypes' or 'q_dtype'/'kv_dtype', not both")
        return {k: self.values(k, v, where, single) for k, v in raw.items() if k in self.parsers}


def _merge(lower: dict, upper: dict, where: str, ctx: _Ctx) -> dict:
    """upper's axes replace lower's; a 'dtypes' pair list replaces both q_dtype and kv_dtype."""
    out = dict(lower)
    if "dtypes" in upper:
        out.pop("q_dtype", None)
        out.pop("kv_dtype", None)
    elif "q_dtype" in upper or "kv_dtype" in upper:
        if "dtypes" in lower:
            if not ("q_dtype" in upper and "kv_dtype" in upper):
                given = "q_dtype" if "q_dtype" in upper else "kv_dtype"
                raise ctx.err(where, given, "sets only one of q_dtype/kv_dtype over 'dtypes' pairs;"
                                            " set both or use 'dtypes'")
            out.pop("dtypes")
    out.update(upper)
    return out


def _expand(axes: dict, where: str, ctx: _Ctx) -> list:
    """Cartesian product of merged axes -> list of concrete value dicts."""
    if "dtypes" in axes:
        pairs = axes["dtypes"]
    else:
        for a in ("q_dtype", "kv_dtype"):
            if a not in axes:
                raise ctx.err(where, a, "missing required axis (set it here, in defaults, or use 'dtypes')")
        pairs = [(q, kv) for q in axes["q_dtype"] for kv in axes["kv_dtype"]]
    lists = [pairs]
    for a in _EXPAND_AXES[1:]:
        if a in axes:
            lists.append(axes[a])
        elif a in _OPTIONAL:
            lists.append([_OPTIONAL[a]])
        elif a == "scales":
            lists.append([None])              # only required when a tensor is fp8: checked per case
        else:
            raise ctx.err(where, a, "missing required axis (set it here or in defaults)")
    cases = []
    for combo in itertools.product(*lists):
        c = dict(zip(_EXPAND_AXES, combo))
        c["q_dtype"], c["kv_dtype"] = c.pop("dtypes")
        cases.append(c)
    return cases


def _matches(case: dict, match: dict) -> bool:
    for k, vals in match.items():
        v = (case["q_dtype"], case["kv_dtype"]) if k == "dtypes" else case[k]
        if v != vals[0]:
            return False
    return True


def _apply(case: dict, sets: dict) -> dict:
    case = dict(case)
    for k, vals in sets.items():
        if k == "dtypes":
            case["q_dtype"], case["kv_dtype"] = vals[0]
        else:
            case[k] = vals[0]
    return case


def _entries(block: dict, key: str, where: str, ctx: _Ctx) -> list:
    raw = block.get(key, [])
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ctx.err(where, key, f"{_show(raw)} is not a list of mappings")
    return raw


def blocks_needed(seq_lens, block_size: int) -> int:
    return sum(-(-kv // block_size) for _, kv in seq_lens)


def default_num_blocks(seq_lens, block_size: int) -> int:
    """Enough blocks for the sequences plus 25% spare (at least 4), so the block table can be a
    random permutation that leaves blocks unused."""
    need = blocks_needed(seq_lens, block_size)
    return need + max(4, -(-need // 4))


def case_id(c: Case, explicit_num_blocks: bool = True) -> str:
    """Stable readable id; optional parts only when not at their default."""
    q, kv = c.q_dtype, c.kv_dtype
    parts = [f"q={q}", f"kv={kv}", f"out={c.out_dtype}", f"gqa={c.heads[0]}:{c.heads[1]}",
             f"d={c.head_size}", f"bs={c.block_size}", f"seqs={c.seqs}"]
    if "fp8" in (q, kv):
        parts.append("scales=" + "/".join(_fmt(s) for s in c.scales))
    if c.scale_layout != "tensor":
        parts.append(f"scale_layout={c.scale_layout}")
    if c.window != -1:
        parts.append(f"win={c.window}")
    if c.softcap:
        parts.append(f"softcap={_fmt(c.softcap)}")
    if not c.causal:
        parts.append("noncausal")
    if c.path != "2d":
        parts.append(f"path={c.path}")
    if c.layout != "contiguous":
        parts.append(f"layout={c.layout}")
    if explicit_num_blocks and c.num_blocks != default_num_blocks(c.seq_lens, c.block_size):
        parts.append(f"nb={c.num_blocks}")
    if c.seed:
        parts.append(f"seed={c.seed}")
    return ",".join(parts)


def _finish(v: dict, where: str, ctx: _Ctx, source: str) -> Case:
    """Concrete values -> Case, with the checks that need several axes at once."""
    q, kv = v["q_dtype"], v["kv_dtype"]
    seq_lens = ctx.sequences[v["seqs"]]
    explicit_nb = v["num_blocks"] is not None
    c = Case(q_dtype=q, kv_dtype=kv, out_dtype=v["out_dtype"],
             scales=v["scales"] or (1.0, 1.0, 1.0), heads=v["heads"], head_size=v["head_size"],
             block_size=v["block_size"],
             num_blocks=v["num_blocks"] or default_num_blocks(seq_lens, v["block_size"]),
             seqs=v["seqs"], seq_lens=seq_lens, window=v["window"], softcap=v["softcap"],
             causal=v["causal"], path=v["path"], scale_layout=v["scale_layout"],
             layout=v["layout"], seed=v["seed"], source=source)
    here = f"{where} case {case_id(c, explicit_nb)}"
    if (q, kv) not in SUPPORTED_PAIRS:
        raise ctx.err(here, "kv_dtype", f"q {q} with kv {kv} is not a supported pair ({_pairs_text()})")
    if "fp8" in (q, kv):
        if v["scales"] is None:
            raise ctx.err(here, "scales", "missing required axis (needed when q or kv is fp8)")
    else:   # no fp8 tensor: scales have no effect, so cases differing only there collapse
        c = dataclasses.replace(c, scales=(1.0, 1.0, 1.0), scale_layout="tensor")
    if c.layout == "shared_blocks" and c.scale_layout == "per_seq_head" and "fp8" in (q, kv):
        raise ctx.err(here, "layout", "shared_blocks needs scale_layout tensor: one stored FP8 block "
                                      "cannot carry two sequences' scales")
    need = blocks_needed(seq_lens, c.block_size)
    if c.num_blocks < need:
        raise ctx.err(here, "num_blocks", f"{c.num_blocks} is fewer than the {need} blocks"
                                          f" mix '{c.seqs}' needs at block_size {c.block_size}")
    return dataclasses.replace(c, id=case_id(c, explicit_nb))


def _parse_sequences(raw, ctx_path: str) -> dict:
    where = "sequences"
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise MatrixError(ctx_path, where, None, f"{_show(raw)} is not a mapping of name -> [[query_len, kv_len], ...]")
    out = {}
    for name, pairs in raw.items():
        w = f"sequences.{name}"
        if not isinstance(name, str):
            raise MatrixError(ctx_path, where, str(name), "sequence mix names must be strings")
        if not isinstance(pairs, list) or not pairs:
            raise MatrixError(ctx_path, w, None, f"{_show(pairs)} is not a non-empty list of [query_len, kv_len]")
        lens = []
        for i, p in enumerate(pairs):
            wi = f"{w}[{i}]"
            if not isinstance(p, list) or len(p) != 2:
                raise MatrixError(ctx_path, wi, None, f"{_show(p)} is not a [query_len, kv_len] pair")
            ql, kvl = p
            if not _is_int(ql):
                raise MatrixError(ctx_path, wi, "query_len", f"{_show(ql)} is not an integer")
            if not _is_int(kvl):
                raise MatrixError(ctx_path, wi, "kv_len", f"{_show(kvl)} is not an integer")
            if ql < 1:
                raise MatrixError(ctx_path, wi, "query_len", f"{ql} is below 1")
            if kvl < ql:
                raise MatrixError(ctx_path, wi, "kv_len", f"{kvl} is shorter than query_len {ql}"
                                                         " (kv_len counts the new tokens too)")
            lens.append((ql, kvl))
        out[name] = tuple(lens)
    return out


def _build(doc: Any, path: str) -> tuple:
    """Parsed matrix document -> ([Case], tolerances path or None)."""
    if not isinstance(doc, dict):
        found = "nothing" if doc is None else f"a {type(doc).__name__}"
        raise MatrixError(path, "top level", None,
                          f"{found}, expected a mapping with keys " + ", ".join(TOP_KEYS))
    for k in doc:
        if k not in TOP_KEYS:
            raise MatrixError(path, "top level", str(k), "unknown key (keys: " + ", ".join(TOP_KEYS) + ")")
    tol = doc.get("tolerances", "tolerances.yaml")
    if not isinstance(tol, str) or not tol:
        raise MatrixError(path, "top level", "tolerances", f"{_show(tol)} is not a file path")
    ctx = _Ctx(path, _parse_sequences(doc.get("sequences"), path))
    defaults = doc.get("defaults")
    defaults = {} if defaults is None else ctx.layer(defaults, "defaults", single=False)
    blocks = doc.get("matrix")
    if blocks is None:
        raise MatrixError(path, "top level", "matrix", "missing (a list of blocks)")
    if not isinstance(blocks, list):
        raise MatrixError(path, "top level", "matrix", f"{_show(blocks)} is not a list of blocks")
    source = os.path.basename(path)
    by_id = {}
    for bi, block in enumerate(blocks):
        name = block.get("name") if isinstance(block, dict) else None
        where = f"matrix[{bi}]" + (f" ({name})" if isinstance(name, str) and name else "")
        if not isinstance(block, dict):
            raise ctx.err(where, None, f"{_show(block)} is not a mapping of axes")
        if "name" in block and not isinstance(name, str):
            raise ctx.err(where, "name", f"{_show(name)} is not a string")
        axes = _merge(defaults, ctx.layer(block, where, single=False, extra=BLOCK_KEYS), where, ctx)

        raw_cases = _expand(axes, where, ctx)
        excludes = []
        for i, e in enumerate(_entries(block, "exclude", where, ctx)):
            w = f"{where} exclude[{i}]"
            m = ctx.layer(e, w, single=True)
            if not m:
                raise ctx.err(w, None, "empty entry (it would drop every case)")
            excludes.append((w, m))
        for w, m in excludes:
            if not any(_matches(c, m) for c in raw_cases):
                raise ctx.err(w, next(iter(m)), "matches no case of this block")
        kept = [c for c in raw_cases if not any(_matches(c, m) for _, m in excludes)]

        for i, e in enumerate(_entries(block, "include", where, ctx)):
            w = f"{where} include[{i}]"
            inc = ctx.layer(e, w, single=True)
            if not inc:
                raise ctx.err(w, None, "empty entry")
            kept += _expand(_merge(axes, inc, w, ctx), w, ctx)

        for i, o in enumerate(_entries(block, "override", where, ctx)):
            w = f"{where} override[{i}]"
            if not isinstance(o, dict):
                raise ctx.err(w, None, f"{_show(o)} is not a mapping with 'match' and 'set'")
            for k in o:
                if k not in ("match", "set"):
                    raise ctx.err(w, str(k), "unknown key (keys: match, set)")
            for k in ("match", "set"):
                if not o.get(k):
                    raise ctx.err(w, k, "missing or empty")
            m = ctx.layer(o["match"], w + " match", single=True)
            s = ctx.layer(o["set"], w + " set", single=True)
            hit = False
            for j, c in enumerate(kept):
                if _matches(c, m):
                    kept[j] = _apply(c, s)
                    hit = True
            if not hit:
                raise ctx.err(w + " match", next(iter(m)), "matches no case of this block")

        if not kept:
            raise ctx.err(where, "exclude" if excludes else None, "expands to no cases")
        for v in kept:
            c = _finish(v, where, ctx, source)
            by_id.setdefault(c.id, c)
    if not by_id:
        raise MatrixError(path, "matrix", "matrix", "no cases after expansion")
    return list(by_id.values()), tol


# ----------------------------------------------------------------------------- tolerances


def _tol_number(v, path, where, field, positive=False) -> float:
    if not _is_num(v) or not math.isfinite(v) or v < 0 or (positive and v == 0):
        need = "a positive number" if positive else "a number >= 0"
        raise MatrixError(path, where, field, f"{_show(v)} is not {need}")
    return float(v)


def load_tolerances(path: str) -> Tolerances:
    path = str(path)
    doc = _read_yaml(path)
    if not isinstance(doc, dict):
        raise MatrixError(path, "top level", None, "expected a mapping with keys rules, adaptive, dtypes")
    for k in doc:
        if k not in ("rules", "adaptive", "dtypes"):
            raise MatrixError(path, "top level", str(k), "unknown key (keys: rules, adaptive, dtypes)")
    rules = doc.get("rules")
    if not isinstance(rules, list) or not rules:
        raise MatrixError(path, "top level", "rules", f"{_show(rules)} is not a non-empty list of "
                                                      + ", ".join(RULES))
    for r in rules:
        if r not in RULES:
            raise MatrixError(path, "rules", str(r), "unknown rule (rules: " + ", ".join(RULES) + ")")
    rules = list(dict.fromkeys(rules))

    adaptive = {}
    raw = doc.get("adaptive")
    if raw is not None or "adaptive" in rules:
        if not isinstance(raw, dict):
            raise MatrixError(path, "top level", "adaptive",
                              f"{_show(raw)} is not a mapping of " + ", ".join(_ADAPTIVE_FIELDS))
        for k in raw:
            if k not in _ADAPTIVE_FIELDS:
                raise MatrixError(path, "adaptive", str(k), "unknown key (keys: " + ", ".join(_ADAPTIVE_FIELDS) + ")")
        for k in _ADAPTIVE_FIELDS:
            if k not in raw:
                raise MatrixError(path, "adaptive", k, "missing")
            adaptive[k] = _tol_number(raw[k], path, "adaptive", k, positive=k != "atol")

    by_dtype = {}
    raw = doc.get("dtypes")
    if not isinstance(raw, dict) or not raw:
        raise MatrixError(path, "top level", "dtypes", f"{_show(raw)} is not a mapping of q/kv/out -> tolerances")
    for key, entry in raw.items():
        parts = key.split("/") if isinstance(key, str) else []
        if (len(parts) != 3 or tuple(parts[:2]) not in SUPPORTED_PAIRS or parts[2] not in OUT_DTYPES):
            raise MatrixError(path, "dtypes", str(key), "unknown key (expected q/kv/out with a supported"
                                                        f" pair ({_pairs_text()}) and out bf16 or fp16)")
        w = f"dtypes.{key}"
        if not isinstance(entry, dict):
            raise MatrixError(path, w, None, f"{_show(entry)} is not a mapping of " + ", ".join(_TOL_FIELDS))
        for k in entry:
            if k not in _TOL_FIELDS:
                raise MatrixError(path, w, str(k), "unknown key (keys: " + ", ".join(_TOL_FIELDS) + ")")
        vals = {}
        for k in _TOL_FIELDS:
            if k not in entry:
                raise MatrixError(path, w, k, "missing")
            vals[k] = _tol_number(entry[k], path, w, k)
        by_dtype[key] = vals
    return Tolerances(rules=rules, by_dtype=by_dtype, adaptive=adaptive, path=path)


# ----------------------------------------------------------------------------- public


def load_suite(path) -> Suite:
    """Read, validate and expand a matrix file and its tolerance file."""
    path = str(path)
    doc = _read_yaml(path)
    try:
        cases, tol_rel = _build(doc, path)
    except MatrixError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        # Last resort so callers only ever see MatrixError.
        raise MatrixError(path, None, None, f"malformed matrix ({e.__class__.__name__}: {e})") from None
    tol_path = os.path.normpath(os.path.join(os.path.dirname(path), tol_rel))
    if not os.path.isfile(tol_path):
        raise MatrixError(path, "top level", "tolerances", f"file not found: {tol_path}")
    tol = load_tolerances(tol_path)
    missing = {}
    for c in cases:
        if c.dtype_key not in tol.by_dtype:
            missing.setdefault(c.dtype_key, c)
    if missing:
        key, c = next(iter(missing.items()))
        raise MatrixError(tol_path, "dtypes", key, f"no tolerance entry, needed by {path} case {c.id}")
    return Suite(path=path, cases=cases, tolerances=tol)


def _term_matches(value, want: str) -> bool:
    if isinstance(value, bool):
        return want.lower() in (("true", "1", "yes") if value else ("false", "0", "no"))
    if _is_num(value):
        try:
            return float(want) == float(value)
        except ValueError:
            return False
    return str(value).lower() == want.lower()


def filter_cases(cases, expr: Optional[str]) -> list:
    """Cases matching expr, in their order.

    expr: comma-separated terms that must all match. `axis=value` compares with
    Case.axis_values() (e.g. q_dtype=fp8,block_size=48,heads=8:2,scales=1/1/1,causal=false;
    alternatives with '|': block_size=16|48; the id's short names q, kv, out, gqa, d, bs, nb, win
    work too); a term without '=' is a substring of the id. Empty expr: all cases.
    """
    expr = (expr or "").strip()
    if not expr:
        return list(cases)
    if "=" not in expr:
        return [c for c in cases if expr in c.id]
    terms = []
    for term in expr.split(","):
        term = term.strip()
        if not term:
            continue
        if "=" not in term:
            terms.append((None, term))
            continue
        axis, _, want = (s.strip() for s in term.partition("="))
        axis = _FILTER_ALIASES.get(axis, axis)
        if axis not in AXES:
            raise MatrixError(None, f"filter {expr!r}", axis, "unknown axis (axes: " + ", ".join(AXES)
                              + "; short: " + ", ".join(_FILTER_ALIASES) + ")")
        terms.append((axis, [w.strip() for w in want.split("|")]))
    out = []
    for c in cases:
        vals = c.axis_values()
        if all((axis is None and want in c.id) or
               (axis is not None and any(_term_matches(vals[axis], w) for w in want))
               for axis, want in terms):
            out.append(c)
    return out


_SEED_SUFFIX = re.compile(r",seed=(\d+)$")


def seeded(case: Case, offset: int) -> Case:
    """The case with its seed moved by offset, under the id a --seeds run gives it."""
    if offset == 0:
        return case
    c = dataclasses.replace(case, seed=case.seed + offset)
    return dataclasses.replace(c, id=case_id(c))


def select_ids(cases, ids, path="") -> list:
    """The cases with exactly these ids, in the order given. An id that ends in ,seed=N (as runs
    with --seeds name their cases) also finds the case run with that seed."""
    by_id = {c.id: c for c in cases}
    out = []
    for want in dict.fromkeys(ids):  # each once
        found = by_id.get(want)
        m = _SEED_SUFFIX.search(want)
        if found is None and m:
            base = by_id.get(want[:m.start()])
            if base is not None and base.seed == 0:
                found = seeded(base, int(m.group(1)))
        if found is None:
            close = difflib.get_close_matches(want, list(by_id), n=1, cutoff=0.0)
            raise MatrixError(path, f"--case {want!r}", None, "no case has this id"
                              + (f" (closest: {close[0]})" if close else ""))
        out.append(found)
    return out


def compile_key(c: Case) -> tuple:
    """The axes that choose a compiled kernel variant (dtypes, head layout, tile shape, features)."""
    # Mirrors our kernel's constexprs: the head ratio only matters through the row tile it needs
    # (decode 16 rows, else 64, at least the ratio). Grouping only; any kernel verifies correctly.
    decode_only = all(ql == 1 for ql, _ in c.seq_lens)
    rows = max(16 if decode_only else 64, 1 << (c.queries_per_kv - 1).bit_length())
    return (c.q_dtype, c.kv_dtype, c.out_dtype, rows, c.head_size, c.block_size,
            c.window > 0, c.softcap > 0, c.causal, c.path, decode_only)


def shard(cases, k: int, n: int) -> list:
    """Shard k of n (1-based). Cases that compile the same kernel variant stay in one shard, so
    parallel workers do not compile a variant twice; groups go, largest first, to the shard with
    the fewest cases so far. The split depends only on the set of cases. Keeps the input order."""
    if not (_is_int(k) and _is_int(n) and 1 <= k <= n):
        raise MatrixError(None, "shard", None, f"{_show(k)}/{_show(n)}: need integers with 1 <= k <= n")
    groups = {}
    for c in {c.id: c for c in cases}.values():
        groups.setdefault(compile_key(c), set()).add(c.id)
    sizes = [0] * n
    mine = set()
    for key in sorted(groups, key=lambda g: (-len(groups[g]), str(g))):
        target = sizes.index(min(sizes))
        sizes[target] += len(groups[key])
        if target == k - 1:
            mine |= groups[key]
    return [c for c in cases if c.id in mine]
