"""Crash-safe files: atomic replace, inter-process locks, size + sha256 records, and caches built on them.

A file written through `atomic_write` / `atomic_path` (a folder through `atomic_dir`) appears under its final
name complete or not at all: the data goes to a hidden temporary name in the same folder (same file system,
so the rename is atomic), is flushed and fsynced, renamed over the target with os.replace, and the parent
folder is fsynced so that the rename itself survives a power cut. `file_lock` makes concurrent first-time
writers wait for each other (fcntl.flock: the kernel drops the lock when its holder dies, so a SIGKILLed
writer never leaves a stale lock behind). Checksum records catch what renaming cannot: entries written by
older versions without these guarantees, and files damaged after they were written.

Reading costs: a check always compares sizes; the sha256 (measured 0.6-0.7 ms per MB on the 2-core dev
machine, i.e. ~0.7 s for the 1 GB converted Gemma 3 safetensors whose load takes ~5 s) is recomputed with
`full=True`, or when the file's mtime is no longer the one recorded with the hash (any write through the OS,
truncation or replacement changes it), see `check_file`.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
import warnings
from typing import Callable, Iterator, Optional

from bmretriever_jax.util.errors import OutputPathError

MANIFEST = "checksums.json"  # inside a folder written by atomic_dir(manifest=True)
RECORD_SUFFIX = ".sha256.json"  # beside a file: NAME.sha256.json = {"size", "sha256", "mtime_ns"}
_TMP = ".tmp-"


class CacheWarning(UserWarning):
    """A cached file or folder failed its check and is rebuilt."""


# ----------------------------------------------------------------------------------------------------
# Temporary names, fsync, atomic replace
# ----------------------------------------------------------------------------------------------------
def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:32] or "host"


def _temp_name(path: str) -> str:
    """A hidden unique name beside `path` that says who made it (host + pid), for remove_stale_temps."""
    folder, base = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{base}{_TMP}{_host()}-{os.getpid()}-{secrets.token_hex(4)}")


def fsync_dir(folder: str) -> None:
    """Make renames and new entries in `folder` durable (a no-op where directories cannot be opened)."""
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


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary file name beside `path` for writers that want a name (np.save, save_file, ...).

    On success the file is fsynced and renamed to `path`; on any error (KeyboardInterrupt too) it is removed
    and `path` is left as it was.
    """
    tmp = _temp_name(path)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb", **open_kw) -> Iterator:
    """`with atomic_write(p, "w") as f: ...`: like open(p, mode), but p appears only when the block succeeds."""
    if not any(c in mode for c in "wx"):
        raise ValueError(f"atomic_write mode {mode!r}: needs a write mode ('w', 'wb')")
    with atomic_path(path) as tmp:
        with open(tmp, mode, **open_kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_dir(path: str, manifest: bool = True) -> Iterator[str]:
    """Yield an empty temporary folder beside `path`; on success it replaces `path`.

    Every file inside is fsynced, a checksum manifest (MANIFEST) is written last when `manifest`, and an
    existing `path` is moved aside, replaced and then deleted. Call under `file_lock(path)` when several
    processes may build the same folder.
    """
    tmp = _temp_name(path)
    os.makedirs(tmp)
    old = None
    try:
        yield tmp
        if manifest:
            write_manifest(tmp)
        for root, _, files in os.walk(tmp):
            for name in files:
                _fsync_file(os.path.join(root, name))
            fsync_dir(root)
        if os.path.lexists(path):
            old = _temp_name(path) + ".old"
            os.rename(path, old)
        os.rename(tmp, path)
    except BaseException:
        _remove(tmp)
        if old and not os.path.lexists(path):  # put the previous folder back rather than lose it
            with contextlib.suppress(OSError):
                os.rename(old, path)
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def remove_stale_temps(folder: str, prefix: str = "") -> list[str]:
    """Delete temporary files/folders in `folder` left by dead processes of this host; return their paths.

    Only names made by _temp_name whose pid is gone are touched, so a live writer's file is never removed.
    `prefix` limits it to one target's temporaries (its base name).
    """
    removed = []
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return removed
    pattern = re.compile(r"\." + re.escape(prefix) + r".*" + re.escape(_TMP) + re.escape(_host()) + r"-(\d+)-")
    for name in names:
        m = pattern.match(name)
        if m and not _pid_alive(int(m.group(1))):
            _remove(os.path.join(folder, name))
            removed.append(os.path.join(folder, name))
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


# ----------------------------------------------------------------------------------------------------
# Locks
# ----------------------------------------------------------------------------------------------------
def lock_path(path: str) -> str:
    folder, base = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{base}.lock")


@contextlib.contextmanager
def file_lock(path: str, shared: bool = False) -> Iterator[None]:
    """Hold an flock on `.NAME.lock` beside `path` (exclusive, or shared for readers); blocks until free.

    The lock file is left in place: deleting it would let a waiter lock a file that a newcomer no longer
    sees. The kernel releases the lock when the holder exits, however it exits.
    """
    lp = lock_path(path)
    os.makedirs(os.path.dirname(lp), exist_ok=True)
    fd = os.open(lp, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the only descriptor releases the flock


# ----------------------------------------------------------------------------------------------------
# Size + sha256 records
# ----------------------------------------------------------------------------------------------------
def sha256_file(path: str, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
    return h.hexdigest()


def file_record(path: str, sha256: Optional[str] = None) -> dict:
    """{"size", "sha256", "mtime_ns"} of a file as it is now (pass sha256 when it is already known)."""
    st = os.stat(path)
    return {"size": st.st_size, "sha256": sha256 or sha256_file(path), "mtime_ns": st.st_mtime_ns}


def check_record(path: str, record: dict, full: bool = False) -> Optional[str]:
    """None if `path` matches its record, else the reason (one line, no path).

    The size is always compared. The sha256 is recomputed when `full`, or when the mtime differs from the
    recorded one: a file nobody wrote to since it was hashed is trusted without reading it again.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing"
    try:
        size, digest = int(record["size"]), str(record["sha256"])
    except (KeyError, TypeError, ValueError):
        return "unreadable checksum record"
    if st.st_size != size:
        return f"{st.st_size} bytes, expected {size} (truncated or partly written)"
    if not full and record.get("mtime_ns") == st.st_mtime_ns:
        return None
    if sha256_file(path) != digest:
        return "sha256 does not match the one recorded when it was written"
    return None


def record_path(path: str) -> str:
    return path + RECORD_SUFFIX


def write_checksum(path: str, sha256: Optional[str] = None) -> dict:
    """Write NAME.sha256.json beside a finished file (atomically); return the record."""
    rec = file_record(path, sha256)
    with atomic_write(record_path(path), "w") as f:
        json.dump(rec, f)
    return rec


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (ValueError, OSError, UnicodeDecodeError):
        return {}


def check_file(path: str, full: bool = False) -> Optional[str]:
    """None if `path` and its NAME.sha256.json agree, else why not ("missing", "no checksum record", ...)."""
    if not os.path.exists(path):
        return "missing"
    rec = _read_json(record_path(path))
    if rec is None:
        return "no checksum record (written by an older version or interrupted)"
    return check_record(path, rec, full)


def write_manifest(folder: str) -> dict:
    """Write folder/MANIFEST = {relative path: record} for every file below `folder`; return it."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            p = os.path.join(root, name)
            rel = os.path.relpath(p, folder)
            if rel != MANIFEST:
                files[rel] = file_record(p)
    with atomic_write(os.path.join(folder, MANIFEST), "w") as f:
        json.dump({"files": files}, f, indent=1)
    return files


def check_manifest(folder: str, full: bool = False) -> Optional[str]:
    """None if every file listed in folder/MANIFEST matches its record, else the first problem (one line)."""
    if not os.path.isdir(folder):
        return "missing"
    man = _read_json(os.path.join(folder, MANIFEST))
    if man is None:
        return f"no {MANIFEST} (written by an older version or interrupted)"
    files = man.get("files") if isinstance(man, dict) else None
    if not isinstance(files, dict) or not files:
        return f"unreadable {MANIFEST}"
    for rel, rec in files.items():
        reason = check_record(os.path.join(folder, rel), rec, full)
        if reason:
            return f"{rel}: {reason}"
    return None


# ----------------------------------------------------------------------------------------------------
# Caches: check, else lock, check again, build atomically
# ----------------------------------------------------------------------------------------------------
def cached_file(path: str, build: Callable[[str], object], *, known_sha256: Optional[str] = None,
                full: bool = False) -> str:
    """`path`, built by `build(tmp_path)` unless a checked copy exists; return `path`.

    A copy that fails its check is rebuilt with a CacheWarning. Concurrent first-time callers wait on a
    lock and the later ones find the finished file. `known_sha256` (the expected content hash, when there is
    one) lets a file without a record, e.g. from an older version, be adopted instead of rebuilt.
    """
    if check_file(path, full) is None:
        return path
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with file_lock(path):
        reason = check_file(path, full)
        if reason is None:
            return path
        if reason != "missing":
            if (known_sha256 and not os.path.exists(record_path(path))
                    and sha256_file(path) == known_sha256):
                write_checksum(path, known_sha256)
                return path
            warnings.warn(f"{path}: {reason}; rebuilding it", CacheWarning, stacklevel=2)
        remove_stale_temps(folder, os.path.basename(path))
        with atomic_path(path) as tmp:
            build(tmp)
            digest = sha256_file(tmp)  # hashed before the rename: a wrong build never gets the final name
            if known_sha256 and digest != known_sha256:
                raise ValueError(f"{path}: the built file's sha256 {digest[:16]}... is not the expected "
                                 f"{known_sha256[:16]}...")
        write_checksum(path, digest)
    return path


def cached_dir(path: str, build: Callable[[str], object], *, full: bool = False) -> str:
    """`path` (a folder), built by `build(tmp_folder)` unless a checked copy exists; return `path`.

    As cached_file, with a MANIFEST of every file's size + sha256 written into the folder before the rename.
    """
    if check_manifest(path, full) is None:
        return path
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with file_lock(path):
        reason = check_manifest(path, full)
        if reason is None:
            return path
        if reason != "missing":
            warnings.warn(f"{path}: {reason}; rebuilding it", CacheWarning, stacklevel=2)
        remove_stale_temps(parent, os.path.basename(path))
        with atomic_dir(path) as tmp:
            build(tmp)
    return path


# ----------------------------------------------------------------------------------------------------
# Output folders
# ----------------------------------------------------------------------------------------------------
def check_writable_dir(path: str, what: str = "--out") -> str:
    """Create `path` if needed and prove a file can be written in it; raise OutputPathError (one line) if not.

    Meant to run before long work, so a read-only or mistyped output folder fails in a second, not after
    the encoding is done.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputPathError(f"{path}: {what} names an existing file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".bmr-write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        reason = e.strerror or str(e)
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            reason += " (read-only file system or no permission)"
        raise OutputPathError(f"{path}: {what} folder is not writable: {reason}") from None
    return path


def check_writable_file(path: str, what: str = "--out") -> str:
    """For an output that is one file: its folder must be writable and `path` must not be a folder."""
    if os.path.isdir(path):
        raise OutputPathError(f"{path}: {what} names an existing folder, not a file")
    check_writable_dir(os.path.dirname(os.path.abspath(path)), what)
    return path
