"""The files midl-convert writes: each written atomically (a temporary name, then one rename) with the
user's umask, and read back with one-line errors.

Temporary files and folders are named ``.NAME.tmp-PID...`` beside their target, so a run killed
mid-write leaves a name that says whose it was; ``clean_stale`` removes those of dead processes.
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import MIDLError


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file: 0o666 less the process umask."""
    try:  # Linux says it without changing it (os.umask would, for a moment, for every thread)
        status = Path("/proc/self/status").read_text()
        mask = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0)
        os.umask(mask)
    return 0o666 & ~mask


def temp_name(path: Path) -> Path:
    """A sibling of ``path`` that names this process: ``.NAME.tmp-PID``."""
    return path.parent / f".{path.name}.tmp-{os.getpid()}"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, on failure remove it.

    Readers see the old file or the new one, never half of one; the file gets the user's umask
    (``tempfile.mkstemp`` would give 0600).
    """
    final = Path(path)
    tmp = temp_name(final)
    _remove(tmp)
    try:
        yield tmp
        os.chmod(tmp, file_mode())
        os.replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (text is UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process, or a platform that cannot tell: leave it be
    return True


def clean_stale(path: str | os.PathLike) -> list[Path]:
    """Remove ``.NAME.tmp-PID*`` leftovers of ``path`` whose process is gone; returns what was removed."""
    final = Path(path)
    if not final.parent.is_dir():
        return []
    removed = []
    for leftover in final.parent.glob(f".{final.name}.tmp-*"):
        pid = leftover.name.rsplit(".tmp-", 1)[1].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            _remove(leftover)
            removed.append(leftover)
    return removed


def read_json(path: str | os.PathLike, fix: str) -> dict[str, Any]:
    """A JSON object from ``path``; a ``MIDLError`` naming the file and ``fix`` when it is not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MIDLError(f"{str(path)!r} is not valid JSON ({exc}); {fix}") from None
    if not isinstance(data, dict):
        raise MIDLError(f"{str(path)!r} holds a JSON {type(data).__name__}, not an object; {fix}")
    return data
