"""The kernel under test, named on the command line: MODULE:FUNCTION (an importable module, e.g.
kernel:unified_attention or harness.mutants:q_scale_ignored) or FILE.py:FUNCTION (a file anywhere,
e.g. an edited copy of kernel/unified_attention.py outside the package)."""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable


def import_file(path: Path, module_name: str) -> ModuleType:
    """Import the Python file at `path` as module `module_name`; raises whatever importing it raises."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module   # Triton and dataclasses look modules up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def _file_module(path_text: str, spec: str) -> ModuleType:
    path = Path(path_text).resolve()
    if not path.is_file():
        raise ValueError(f"--kernel {spec!r}: no file {path}")
    # One module per file and process, so that its compiled kernels are reused across calls.
    name = f"_kernel_file_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
    if name in sys.modules:
        return sys.modules[name]
    try:
        return import_file(path, name)
    except Exception as e:  # noqa: BLE001  (a syntax error, a missing import: one line either way)
        raise ValueError(f"--kernel {spec!r}: cannot import {path}: {type(e).__name__}: {e}") from None


def load_kernel(spec: str) -> Callable:
    """'module:function' or 'file.py:function' -> the callable; raises ValueError with a one-line reason."""
    where, _, fn_name = spec.rpartition(":")
    if not where or not fn_name:
        raise ValueError(f"--kernel {spec!r}: expected MODULE:FUNCTION or FILE.py:FUNCTION")
    if where.endswith(".py"):
        module = _file_module(where, spec)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ValueError(f"--kernel {spec!r}: cannot import {where}: {e}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"--kernel {spec!r}: {where} has no callable {fn_name}")
    return fn
