"""Peak FLOP/s: the table on known GPUs, and the best CPU measurement remembered across runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mllm.train import flops


@pytest.fixture
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path


def test_a_low_measurement_does_not_replace_a_better_one(cache_home: Path) -> None:
    assert flops.remember_best_peak("cpu|x|bf16|2", 400e9) == 400e9
    assert flops.remember_best_peak("cpu|x|bf16|2", 150e9) == 400e9  # measured under load
    assert flops.remember_best_peak("cpu|x|bf16|2", 420e9) == 420e9
    saved = json.loads((cache_home / "mllm" / "peak_flops.json").read_text())
    assert saved == {"cpu|x|bf16|2": 420e9}


def test_a_corrupt_or_unwritable_cache_only_loses_the_memory(cache_home: Path) -> None:
    path = cache_home / "mllm" / "peak_flops.json"
    path.parent.mkdir(parents=True)
    path.write_text("not json")
    assert flops.remember_best_peak("k", 1e9) == 1e9
    path.unlink()
    path.mkdir()  # a folder where the file should be: writing fails
    assert flops.remember_best_peak("k", 2e9) == 2e9


def test_known_gpus_come_from_the_table() -> None:
    assert flops.peak_flops("cuda", torch.bfloat16, "NVIDIA H100 80GB HBM3") == 989e12


def test_cpu_peak_is_measured_and_positive(cache_home: Path) -> None:
    flops.peak_flops.cache_clear()
    assert flops.peak_flops("cpu", torch.float32) > 1e9
