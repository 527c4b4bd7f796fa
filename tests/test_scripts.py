"""Every script in scripts/ starts: a Python one imports and answers --help, a shell one parses. Most need a
GPU to do their work, so without this a script whose import broke stays broken until a GPU lease
runs it (scripts/profile_kernel.py once imported a helper that had been removed)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((ROOT / "scripts").glob("*.py"))


def test_there_are_scripts_to_check():
    assert {p.name for p in SCRIPTS} >= {"profile_kernel.py", "tune_launch.py", "sass_report.py", "probe_fp8_pv.py"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_the_script_starts(script):
    out = subprocess.run([sys.executable, str(script), "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.lstrip().startswith("usage:")


@pytest.mark.parametrize("script", sorted((ROOT / "scripts").glob("*.sh")), ids=lambda p: p.name)
def test_the_shell_script_parses(script):
    out = subprocess.run(["bash", "-n", str(script)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
