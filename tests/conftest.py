"""Shared test fixtures: the real CLI in a subprocess, the offline hub, the shared English text."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import settings

# CI explores the same examples on every run (a failure there is reproducible, never luck);
# local runs keep hypothesis's random exploration, which is how new bugs are found.
settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

# Any hub call fails at once instead of after a minute of retries: tests never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# What mllm remembers between runs (the best measured peak FLOP/s) stays out of the user's home.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="mllm-test-cache-")

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
SHARED_DATA_EXTRA = REPO_ROOT.parent / "shared" / "data-extra"


@pytest.fixture
def shared_data() -> Path:
    """../shared/data (real English text); tests that need it skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real text not found at {SHARED_DATA} (CI always has it)")
    return SHARED_DATA


@pytest.fixture
def shared_data_extra() -> Path:
    """../shared/data-extra (more real text); skipped where absent."""
    if not SHARED_DATA_EXTRA.is_dir():
        pytest.skip(f"extra text not found at {SHARED_DATA_EXTRA}")
    return SHARED_DATA_EXTRA


RunCli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def run_cli(tmp_path: Path) -> RunCli:
    """Run the real `mllm` CLI (`python -m mllm ...`) in a subprocess, in tmp_path by default."""

    def run(
        *args: str | os.PathLike[str],
        cwd: Path | None = None,
        timeout: float = 600,
        env: dict[str, str] | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        full_env.update(env or {})
        return subprocess.run(
            [sys.executable, "-m", "mllm", *map(str, args)],
            cwd=cwd or tmp_path,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=full_env,
            input=input,
        )

    return run
