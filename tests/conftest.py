"""Test session settings (hypothesis profile, no network, a private cache), and the fixtures of
tests/fixtures.py, the one fixture layer, exported by name (none is autouse)."""

from __future__ import annotations

import os
import tempfile

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

# Imported after the environment above is set: mllm and the hub libraries read it on import.
from fixtures import (  # noqa: E402
    one_torch_thread,
    run_cli,
    shared_data,
    shared_data_extra,
)

__all__ = ["one_torch_thread", "run_cli", "shared_data", "shared_data_extra"]
