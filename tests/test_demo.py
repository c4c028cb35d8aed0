"""`make demo`: the demo script runs the whole pipeline through the real CLI (scaled down here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO = REPO_ROOT / "scripts" / "demo.sh"

TINY = {  # the demo's knobs, shrunk so the whole pipeline takes seconds
    "DEMO_MAX_LINES": "300",
    "DEMO_VOCAB": "300",
    "DEMO_CONTEXT": "32",
    "DEMO_D_MODEL": "32",
    "DEMO_LAYERS": "1",
    "DEMO_HEADS": "2",
    "DEMO_BATCH": "4",
    "DEMO_STEPS": "4",
    "DEMO_COMPILE": "0",
    "DEMO_NEW_TOKENS": "8",
    "DEMO_SAMPLES": "2",
}


def run_demo(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PY": sys.executable, "HF_HUB_OFFLINE": "1", **TINY, **env}
    return subprocess.run(
        ["bash", str(DEMO), *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_demo_runs_the_pipeline_twice_on_local_text(tmp_path: Path, shared_data: Path) -> None:
    first = run_demo(tmp_path, str(shared_data))
    assert first.returncode == 0, first.stdout + first.stderr
    for command in ("corpus", "tokenize", "pack", "train", "eval", "generate"):
        assert f"==> mllm {command}" in first.stdout
    assert first.stdout.count("Once upon a time") >= 2  # the two samples (and the heading)
    assert "bits per byte" in first.stdout
    assert "Where everything went" in first.stdout
    data_dir, run_dir = tmp_path / "data/demo", tmp_path / "runs/demo"
    for name in ("corpus.txt", "tokenizer.json", "train.bin", "val.bin", "data.json"):
        assert (data_dir / name).is_file()
    assert (run_dir / "checkpoints").is_dir()

    # A second run replaces the first one's training run (instead of failing or resuming it),
    # and its time budget plans fewer steps than asked for: eval and generate use that run.
    (run_dir / "leftover-from-first-run").write_text("x")
    second = run_demo(tmp_path, str(shared_data), DEMO_STEPS="1000000", DEMO_TRAIN_SECONDS="25")
    assert second.returncode == 0, second.stdout + second.stderr
    assert not (run_dir / "leftover-from-first-run").exists()
    assert "time budget fitted" in second.stdout
    steps = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert len(steps) == 1 and steps[0] not in ("step_000004", "step_1000000")
    assert steps[0] in second.stdout  # the eval table names the checkpoint it scored
    assert second.stdout.count("Once upon a time") >= 2


def test_demo_leaves_out_default_sources_without_a_folder(
    tmp_path: Path, shared_data: Path
) -> None:
    data = tmp_path / "texts"
    (data / "tinystories").mkdir(parents=True)
    for file in (shared_data / "tinystories").glob("*.txt"):
        (data / "tinystories" / file.name).write_bytes(file.read_bytes())
    result = run_demo(tmp_path, str(data), DEMO_STEPS="2", DEMO_SAMPLES="1")
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("wikitext", "fineweb"):
        assert f"no {name}/ subfolder: leaving {name} out of the mix" in result.stdout
    assert "Once upon a time" in result.stdout


def test_demo_without_the_hub_says_how_to_use_local_text(tmp_path: Path) -> None:
    result = run_demo(tmp_path)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1  # one line
    assert "cannot be reached" in result.stderr and "make demo DATA=" in result.stderr


@pytest.mark.parametrize("layout", ["missing", "file", "empty"])
def test_demo_rejects_a_data_folder_it_cannot_use(tmp_path: Path, layout: str) -> None:
    data = tmp_path / "texts"
    if layout == "file":
        data.write_text("not a folder")
    elif layout == "empty":
        data.mkdir()
    result = run_demo(tmp_path, str(data))
    assert result.returncode == 2
    assert result.stderr.startswith("demo: DATA=") and result.stderr.count("\n") == 1
