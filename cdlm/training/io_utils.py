"""Atomic file writes and JSONL helpers: every stage's outputs survive being killed mid-write.

Every temporary this pipeline creates is named `.<final name>.<random>.tmp` (files and
directories) or `.<final name>.old` (a directory being replaced), next to its final name, so
a rerun can find and remove what a killed run left behind (`remove_stale_temporaries`).
A full disk is reported as such (`DiskFullError`), whatever layer noticed it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# How libraries that wrap the OS error in their own exception spell it (safetensors' Rust
# writer: "I/O error: No space left on device (os error 28)").
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "os error 28",
                   "os error 122")


class DiskFullError(OSError):
    """A write failed because its filesystem is full (or over quota)."""


def is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
        return True
    return any(text in str(exc) for text in _DISK_FULL_TEXT)


def _free_bytes(path: Path) -> int | None:
    for candidate in (path, *path.parents):
        try:
            st = os.statvfs(candidate)
            return st.f_bavail * st.f_frsize
        except OSError:
            continue
    return None


@contextmanager
def reporting_disk_full(path: str | Path) -> Iterator[None]:
    """Turn any disk-full failure inside into a DiskFullError that names the path."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        free = _free_bytes(Path(path))
        where = f"{free / 2**20:.1f} MiB free there" if free is not None else "free space unknown"
        raise DiskFullError(errno.ENOSPC, f"no space left on device while writing {path} "
                            f"({where}); free some space (or point --out elsewhere) and rerun "
                            "the same command: it resumes from the last complete checkpoint"
                            ) from exc


def temp_path_next_to(path: str | Path) -> Path:
    """A fresh, empty temporary file beside `path` (to be renamed onto it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def atomic_write_bytes(path: str | Path, data: bytes | memoryview) -> None:
    """Write via a temporary file in the same directory, fsync, rename over `path`."""
    path = Path(path)
    with reporting_disk_full(path):
        tmp = temp_path_next_to(path)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def write_json_if_changed(path: str | Path, obj: Any) -> bool:
    """atomic_write_json unless the file already holds exactly this (so rerunning a finished
    stage writes nothing, and works on a read-only output). Returns whether it wrote."""
    path = Path(path)
    text = json.dumps(obj, indent=2) + "\n"
    try:
        if path.read_text() == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    atomic_write_text(path, text)
    return True


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: str | Path) -> list[dict]:
    return list(iter_jsonl(path))


def iter_jsonl(path: str | Path) -> Iterator[dict]:
    with open(path) as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def tmp_dir_next_to(path: str | Path) -> Path:
    """A fresh temporary directory beside `path`, to be renamed onto it when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))


def replace_dir(tmp: Path, final: str | Path) -> None:
    """Move a completed directory into place; the old one (if any) goes only after the new is in."""
    final = Path(final)
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def remove_stale_temporaries(directory: str | Path, finals: Iterable[str] | None = None
                             ) -> list[Path]:
    """Delete the temporaries a killed run left in `directory` (see the module doc): all of
    them, or only those of the final names in `finals`. Call it only where no other process
    is writing those names."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    prefixes = None if finals is None else tuple(f".{name}." for name in finals)
    stale = [p for p in directory.iterdir()
             if p.name.startswith(".") and p.name.endswith((".tmp", ".old"))
             and (prefixes is None or p.name.startswith(prefixes))]
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return stale


def append_jsonl(path: str | Path, row: dict) -> None:
    """Append one line (loss curves): a torn last line is skipped by readers of logs."""
    with reporting_disk_full(path), open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def truncate_log(path: str | Path, last_step: int) -> None:
    """Keep only the rows of steps <= last_step (and drop a torn last line): a run resumed from
    the checkpoint of `last_step` then appends each later step exactly once."""
    path = Path(path)
    if not path.exists():
        return
    kept, changed = [], False
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            changed = True
            continue
        if int(row.get("step", 0)) <= last_step:
            kept.append(line)
        else:
            changed = True
    if changed:
        atomic_write_text(path, "".join(line + "\n" for line in kept))
