"""harness.kernels: the kernel under test by module or by file, and one-line refusals."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from harness.kernels import load_kernel

ROOT = Path(__file__).resolve().parent.parent


def test_a_kernel_file_outside_any_package_is_loaded_once(tmp_path):
    copy = tmp_path / "my_variant.py"
    shutil.copy(ROOT / "kernel" / "unified_attention.py", copy)
    fn = load_kernel(f"{copy}:unified_attention")
    assert Path(sys.modules[fn.__module__].__file__) == copy.resolve()
    assert load_kernel(f"{copy}:unified_attention") is fn  # one module per file: its compiled kernels stay
    assert load_kernel("kernel:unified_attention") is not fn


@pytest.mark.parametrize("text, spec_tail, reason", [
    (None, ":unified_attention", "no file"),
    ("def unified_attention(:\n", ":unified_attention", "cannot import"),
    ("x = 1\n", ":unified_attention", "has no callable unified_attention"),
    ("x = 1\n", "", "expected MODULE:FUNCTION or FILE.py:FUNCTION"),
])
def test_a_bad_kernel_file_is_refused_in_one_line(tmp_path, text, spec_tail, reason):
    path = tmp_path / "broken.py"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ValueError) as e:
        load_kernel(f"{path}{spec_tail}")
    assert reason in str(e.value) and "\n" not in str(e.value)


def test_a_module_that_cannot_be_imported_is_refused_in_one_line():
    with pytest.raises(ValueError, match="cannot import no_such_module"):
        load_kernel("no_such_module:unified_attention")
