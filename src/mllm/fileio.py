"""Atomic file writes: a killed step never leaves a file a later step takes for complete.

Every artifact is written to a temporary file in the same folder, flushed and fsynced, then
renamed over its final name (rename within one filesystem is atomic on POSIX and Windows).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from mllm.errors import MllmError, UsageError


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (a no-op where the OS cannot open folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask (reading it means setting it: set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Files we create get the usual permissions (0666 minus the umask), not mkstemp's private 0600.
_FILE_MODE = 0o666 & ~current_umask()


def swap_in_folder(tmp: Path, final: Path, aside: Path) -> None:
    """Rename the complete folder `tmp` to `final`. An existing `final` is renamed to `aside`
    first and removed after, so a complete folder is at `final` or at `aside` at every moment (a
    second signal between the renames leaves `aside`; a failed rename puts it back). A stale
    `aside` left by an earlier swap cut short is removed too."""
    replaced = final.exists()
    if replaced:
        shutil.rmtree(aside, ignore_errors=True)
        final.rename(aside)
    try:
        tmp.rename(final)
    except BaseException:
        if replaced:
            aside.rename(final)
        raise
    fsync_dir(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


def temp_path_for(path: Path) -> Path:
    """A fresh temporary path beside `path` (same folder, so a rename onto `path` is atomic),
    with the permissions a plainly created file would have."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _FILE_MODE)
    except (AttributeError, OSError):  # Windows has no fchmod; the default there is fine
        pass
    finally:
        os.close(fd)
    return Path(name)


def remove_stale_temp_files(path: Path) -> int:
    """Delete temporary files that a killed writer of `path` left beside it (a SIGKILL gives no
    chance to clean up, and a bin's temporary file can be gigabytes); return how many.

    Only for artifacts one process writes at a time (two writers of one file would collide
    anyway).
    """
    removed = 0
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()
            removed += 1
    return removed


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file for writing that replaces `path` only if the block succeeds.

    `path` must be a regular file or not exist yet: writing "to" /dev/null or a folder is refused.

    On any exception (KeyboardInterrupt included) the temporary file is removed and `path` is left
    as it was.
    """
    path = Path(path)
    if path.exists() and not path.is_file():
        # A rename would replace a device (/dev/null, /dev/stdout) or fail on a folder.
        raise UsageError(f"{path} exists and is not a regular file: give a file path to write")
    ensure_writable_dir(path.parent)
    tmp = temp_path_for(path)
    try:
        encoding = None if "b" in mode else "utf-8"
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write UTF-8 `text` to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write `obj` as indented JSON (with a final newline) to `path` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike[str], what: str) -> Any:
    """Read a JSON file, turning a missing or corrupt file into one clear MllmError.

    `what` names the artifact in the message (e.g. "data.json").
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MllmError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MllmError(f"{what} is not valid JSON: {path} ({e})") from None


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks (files may be larger than RAM)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def ensure_writable_dir(folder: str | os.PathLike[str]) -> Path:
    """Create `folder` if needed and check we can write in it, or raise one clear MllmError."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MllmError(f"cannot create folder {folder}: {e.strerror or e}") from None
    if not folder.is_dir():
        raise MllmError(f"not a folder: {folder}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise MllmError(f"folder is not writable: {folder}")
    return folder
