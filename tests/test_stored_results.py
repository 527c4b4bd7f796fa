"""scripts/stored_results.sh: which stored results a GPU run is compared with."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("card, folder", [("NVIDIA H100 80GB HBM3", "results/h100"),
                                          ("NVIDIA H200", "results/h200"),
                                          ("NVIDIA A100-SXM4-80GB", "results/h200")])
def test_the_folder_of_the_same_card(card, folder):
    out = subprocess.run(["bash", "scripts/stored_results.sh", card], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == folder
    assert (ROOT / folder / "bench.json").is_file() and (ROOT / folder / "results.json").is_file()
