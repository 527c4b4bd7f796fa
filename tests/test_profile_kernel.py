"""scripts/profile_kernel.py, the program scripts/ncu_profile.sh profiles: it must import and launch
(it once imported a helper that had been removed, which only a GPU lease found)."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import run as bench  # noqa: E402
from scripts import profile_kernel, tune_launch  # noqa: E402


def test_launches_the_batch_with_the_kernels_own_configuration(capsys):
    assert profile_kernel.main(["prefill", "1", "64", "16", "--launches", "1"]) == 0
    printed = capsys.readouterr().out
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    call = bench.build_calls(bench.prefill(1, 64, 16), "fp8", "fp8", 1, device, seed=0)[0]
    assert printed.startswith("prefill 1x64 bs=16 q=fp8 kv=fp8 ")
    assert str(dataclasses.asdict(tune_launch.default_config(call))) in printed


def test_a_config_override_is_what_it_launches(capsys):
    assert profile_kernel.main(["decode", "2", "64", "16", "--q", "bf16", "--kv", "bf16",
                                "--config", '{"num_stages": 3}', "--launches", "1"]) == 0
    assert "'num_stages': 3" in capsys.readouterr().out
