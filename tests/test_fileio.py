"""Atomic writes: all or nothing, usual permissions, and never over something that is not a file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from mllm.errors import UsageError
from mllm.fileio import atomic_open, atomic_write_text, remove_stale_temp_files


def test_a_failed_write_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_open(target, "w") as f:
        f.write("new")
        raise RuntimeError("killed half way")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_files_get_the_usual_permissions(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    atomic_write_text(target, "x")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


@pytest.mark.parametrize("target", ["/dev/null", "folder"])
def test_a_path_that_is_not_a_regular_file_is_refused(tmp_path: Path, target: str) -> None:
    path = Path(target) if target.startswith("/") else tmp_path / target
    if not path.exists():
        path.mkdir()
    with pytest.raises(UsageError, match="not a regular file"):
        atomic_write_text(path, "x")
    assert not path.is_file()


def test_stale_temporary_files_of_one_name_are_removed(tmp_path: Path) -> None:
    (tmp_path / ".train.bin.abc.tmp").write_text("x")
    (tmp_path / ".val.bin.abc.tmp").write_text("x")
    assert remove_stale_temp_files(tmp_path / "train.bin") == 1
    assert [p.name for p in tmp_path.iterdir()] == [".val.bin.abc.tmp"]
