"""Crash-safe file writes: temporary name, fsync, rename (DESIGN §6)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Temporary names carry host and process: after a crash (kill -9, power loss) the next run on the
# same host removes the leftovers of processes that are gone, and never those of a live one.
_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:20] or "host"
_TEMP = re.compile(r"^\..+\.(?:tmp|old)-(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)(?:-[0-9a-f]+)?$")
STALE_SECONDS_WITHOUT_PID_CHECK = 24 * 3600


def temp_path(path: Path, kind: str = "tmp") -> Path:
    """A hidden sibling of ``path`` unique to this process and call (threads may race)."""
    return path.with_name(f".{path.name}.{kind}-{_HOST}-{os.getpid()}-{os.urandom(4).hex()}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _left_by_a_dead_process(path: Path, pid: int) -> bool:
    if os.name == "nt":  # signal 0 would kill a live process there: go by age instead
        try:
            return time.time() - path.stat().st_mtime >= STALE_SECONDS_WITHOUT_PID_CHECK
        except OSError:
            return False
    return not _alive(pid)


def sweep_temps(root: Path) -> int:
    """Remove temporary files and folders left under ``root`` by crashed processes; the count.

    Only this host's leftovers whose process is gone (on Windows, those older than a day); a
    temporary name from another host or a live process stays."""
    removed = 0
    for dirpath, dirnames, filenames in os.walk(root):  # nothing when root does not exist
        for name in [*dirnames, *filenames]:
            m = _TEMP.match(name)
            path = Path(dirpath) / name
            if not m or m["host"] != _HOST or not _left_by_a_dead_process(path, int(m["pid"])):
                continue
            if name in dirnames and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
                dirnames.remove(name)  # do not walk into what was removed
            else:
                path.unlink(missing_ok=True)
            removed += 1
    return removed


def fsync_dir(path: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` so that ``path`` holds either its old or its new content, never a mix."""
    path = Path(path)
    tmp = temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(dirpath))


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written and fsynced directory into place, replacing an older one."""
    old = temp_path(final, "old")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_text(path: Path, what: str, max_bytes: int) -> str:
    """A small UTF-8 text file (BOM tolerated) that outside input gave us, or a BadInput naming it."""
    from .errors import BadInput

    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: {what} does not exist")
    if path.stat().st_size > max_bytes:
        raise BadInput(f"{path}: {what} is larger than {max_bytes // 2**20} MiB")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BadInput(f"{path}: {what} is not UTF-8 text") from exc
    if "\x00" in text:
        raise BadInput(f"{path}: {what} is binary, not text")
    return text



@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (made if missing) between processes on this host: flock on
    POSIX, msvcrt.locking on Windows. Released when the process dies, so a kill -9 never leaves it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.name == "nt":
            import msvcrt

            msvcrt.locking(fd, msvcrt.LK_LOCK, 1)  # retries for 10 s, then raises OSError
        else:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
