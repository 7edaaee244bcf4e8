"""The files midl-convert writes: each written atomically (a temporary name, then one rename) with the
user's umask, and read back with one-line errors.

Temporary files and folders are named ``.NAME.tmp-PID-RANDOM`` beside their target, so a run killed
mid-write leaves a name that says whose it was, and no name a user already has is ever reused.
A folder of this tool's own (a temporary folder, a checkpoint folder) carries a marker file that
names what it is for; ``clean_stale`` and ``remove_own_dir`` delete only what carries that marker,
as ``git clean`` leaves what it does not track: a user's folder of the same shape is left alone.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import MIDLError

log = logging.getLogger(__name__)
MARKER_FILE = ".midl-convert"  # inside a folder this tool made: {"tool": "midl-convert", "for": ..., "pid": ...}


def cache_dir() -> Path:
    """Where the layer budget's measurements are kept: ``$MIDL_CACHE_DIR``, else ``$XDG_CACHE_HOME/midl_convert``
    (``~/.cache``); the latency times sit beside them."""
    root = os.environ.get("MIDL_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "midl_convert"
    return Path(root) / "budget"


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
    """A sibling of ``path`` that names this process and exists nowhere yet: ``.NAME.tmp-PID-RANDOM``."""
    while True:
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        if not os.path.lexists(tmp):
            return tmp


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, on failure remove it.

    Readers see the old file or the new one, never half of one; the file gets the user's umask
    (``tempfile.mkstemp`` would give 0600).
    """
    final = Path(path)
    tmp = temp_name(final)
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


def make_own_dir(path: Path, purpose: str) -> Path:
    """Create the folder ``path`` (it must not exist) with this tool's marker naming ``purpose``."""
    path.mkdir(parents=True)
    (path / MARKER_FILE).write_text(json.dumps({"tool": "midl-convert", "for": purpose, "pid": os.getpid()}))
    return path


def own_dir_marker(path: Path, purpose: str) -> dict[str, Any] | None:
    """The marker of a folder this tool made for ``purpose``; ``None`` for anything else (a user's folder, a link)."""
    if path.is_symlink() or not path.is_dir():
        return None
    try:
        marker = json.loads((path / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    ok = isinstance(marker, dict) and marker.get("tool") == "midl-convert" and marker.get("for") == purpose
    return marker if ok else None


def remove_own_dir(path: Path, purpose: str, names: tuple[str, ...] = ()) -> bool:
    """Remove a folder this tool made for ``purpose``: its marker and the files ``names`` it wrote, then the
    folder if nothing else is in it. Anything the tool cannot prove its own stays, with one line. True when gone."""
    if not os.path.lexists(path):
        return True
    if own_dir_marker(path, purpose) is None:
        log.warning(f"left {path} in place: it is not a folder midl-convert made (no {MARKER_FILE} marker for this run)")
        return False
    for name in names:
        (path / name).unlink(missing_ok=True)
    (path / MARKER_FILE).unlink(missing_ok=True)
    try:
        path.rmdir()
    except OSError:
        log.warning(f"left {path} in place: it holds files midl-convert did not write")
        return False
    return True


def temp_dir(final: Path) -> Path:
    """A new marked temporary folder beside ``final`` (see ``clean_stale``)."""
    return make_own_dir(temp_name(final), f"temp:{final.name}")


def clean_stale(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary folders of ``path`` that this tool made (marked) in processes that are gone.

    A ``.NAME.tmp-*`` entry without the marker is a user's, whatever its name: it stays, with one line.
    """
    final = Path(path)
    if not final.parent.is_dir():
        return []
    removed = []
    for leftover in final.parent.glob(f".{final.name}.tmp-*"):
        marker = own_dir_marker(leftover, f"temp:{final.name}")
        if marker is None:
            log.warning(f"left {leftover} in place: named like a midl-convert temporary folder, but not one")
            continue
        pid = marker.get("pid")
        if isinstance(pid, int) and pid != os.getpid() and not _alive(pid):
            shutil.rmtree(leftover, ignore_errors=True)
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
