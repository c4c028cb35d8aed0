"""retain_freed_memory: a loop that allocates the same large blocks again stops page-faulting."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import textwrap

import pytest

from mllm.train.cpu_memory import retain_freed_memory

# Allocates and frees a training-step-like set of blocks (1-40 MB) round after round and prints
# the page faults of each of the last seven rounds (the first ones settle the heap), after calling
# retain_freed_memory() when argv[1] is "1".
ROUNDS_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, torch
    from mllm.train.cpu_memory import retain_freed_memory
    if sys.argv[1] == "1":
        assert retain_freed_memory()
    def one_round():
        blocks = [torch.ones(n << 20, dtype=torch.uint8) for n in (1, 3, 16, 40, 8)]
        return sum(int(b[0]) for b in blocks)
    for _ in range(4):
        one_round()
    faults = []
    for _ in range(7):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        one_round()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps(faults))
    """
)


def median_page_faults_per_round(retain: bool) -> int:
    """Median over rounds: the heap may still grow once in a later round (one block faulted in
    once, seen now and then), which is not the per-step cost this is about."""
    done = subprocess.run(
        [sys.executable, "-c", ROUNDS_SCRIPT, "1" if retain else "0"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(statistics.median(json.loads(done.stdout)))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_retained_memory_is_reused_without_page_faults() -> None:
    if not retain_freed_memory():  # also applies it here, harmlessly: the test process is Linux
        pytest.skip("not glibc")
    default = median_page_faults_per_round(retain=False)
    retained = median_page_faults_per_round(retain=True)
    assert default > 1_000  # each round faults its ~68 MB in again (17,000 pages)
    assert retained < default / 10, (retained, default)


@pytest.mark.skipif(sys.platform.startswith("linux"), reason="checks the non-Linux answer")
def test_elsewhere_nothing_changes() -> None:
    assert retain_freed_memory() is False
