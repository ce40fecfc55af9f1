"""Paths that may be URLs: the one layer every user-given path goes through (`out:`, model, data, dev, prepared).

A URL is `scheme://...` for any fsspec protocol (gs:// with gcsfs, s3:// with s3fs, ...; `file://` is the
local file system through the same code). Plain paths pass through untouched.

- `fetch(path)` -> a local path: a remote file or folder is copied once into $BMR_CACHE/remote/ and reused
  while the remote listing (names and sizes) is unchanged. Models (memory-mapped safetensors, GGUF), data
  readers and prepared Arrow folders then read local files.
- `RunFolder(out)`: a run folder at a URL. Orbax writes the checkpoints to the URL itself
  (`RunFolder.checkpoints`); everything else the run writes (config.yaml, metrics.jsonl, the exported model)
  goes to a local staging folder that `pull()` fills from the URL when a run resumes and `push()` uploads.

Credentials are the file system's own (gcsfs: application default credentials; `STORAGE_EMULATOR_HOST` for an
emulator).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import uuid
from typing import Dict, Tuple

from bmretriever_jax.util.errors import InputPathError

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_url(path) -> bool:
    return isinstance(path, str) and bool(_URL.match(path))


def cache_root() -> str:
    return os.environ.get("BMR_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "bmretriever_jax"))


def filesystem(url: str):
    """(fsspec file system, path inside it) of a URL; a one-line error when its protocol is not installed."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        scheme = url.split("://", 1)[0]
        hint = {"gs": "pip install gcsfs", "s3": "pip install s3fs"}.get(scheme, f"an fsspec package for {scheme}://")
        raise InputPathError(f"{url}: no file system for {scheme}:// ({hint}): {e}") from None


def join(base: str, *parts: str) -> str:
    if is_url(base):
        return "/".join([base.rstrip("/")] + [p.strip("/") for p in parts])
    return os.path.join(base, *parts)


def exists(path: str) -> bool:
    if not is_url(path):
        return os.path.exists(path)
    fs, p = filesystem(path)
    return fs.exists(p)


def _version(info: dict) -> list:
    """What identifies an object's content: size + the store's generation / hash / modification time."""
    tag = next((info[k] for k in ("generation", "md5Hash", "ETag", "etag", "mtime", "updated", "LastModified")
                if info.get(k) is not None), "")
    return [int(info.get("size") or 0), str(tag)]


def _listing(fs, p: str) -> Tuple[bool, Dict[str, list]]:
    """(is a folder, {relative name: version}) of a remote file or folder; FileNotFoundError if neither."""
    if fs.isdir(p):
        files = fs.find(p, detail=True)
        root = p.rstrip("/") + "/"
        return True, {k[len(root):] if k.startswith(root) else k: _version(v) for k, v in files.items()}
    if not fs.exists(p):
        raise FileNotFoundError(p)
    return False, {os.path.basename(p): _version(fs.info(p))}


def fetch(path: str, quiet: bool = True) -> str:
    """A local path for `path`: itself when local (file:// stripped); else a copy in $BMR_CACHE/remote/."""
    if not is_url(path):
        return path
    if path.startswith("file://"):
        return path[len("file://"):]
    fs, p = filesystem(path)
    try:
        is_dir, listing = _listing(fs, p)
    except FileNotFoundError:
        raise InputPathError(f"{path}: no such file or folder") from None
    key = hashlib.sha256(path.rstrip("/").encode()).hexdigest()[:16]
    name = os.path.basename(p.rstrip("/")) or "root"
    dest_root = os.path.join(cache_root(), "remote", key)
    dest = os.path.join(dest_root, name)
    stamp = os.path.join(dest_root, ".listing.json")
    os.makedirs(os.path.dirname(dest_root), exist_ok=True)
    import fcntl  # POSIX only: imported where the lock is taken, so the module itself imports anywhere

    # one copy at a time per cache entry (processes on one host, or hosts sharing a home folder): the others
    # wait, then find the copy current
    with open(dest_root + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(stamp):
            with open(stamp) as f:
                if json.load(f) == listing and os.path.exists(dest):
                    return dest
        if not quiet:
            size = sum(v[0] for v in listing.values())
            print(f"fetching {path} ({size / 2**20:.1f} MB) into {dest_root}", flush=True)
        tmp = f"{dest_root}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:  # filled, then renamed: a reader never sees half a copy
            target = os.path.join(tmp, name)
            if is_dir:
                for rel in listing:
                    os.makedirs(os.path.dirname(os.path.join(target, rel)), exist_ok=True)
                    fs.get(p.rstrip("/") + "/" + rel, os.path.join(target, rel))
            else:
                os.makedirs(tmp, exist_ok=True)
                fs.get(p, target)
            with open(os.path.join(tmp, ".listing.json"), "w") as f:
                json.dump(listing, f)
            shutil.rmtree(dest_root, ignore_errors=True)  # an outdated copy (nobody else holds the lock)
            os.replace(tmp, dest_root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


class RunFolder:
    """A training run's `out:` (see the module docstring). For a local path, `local` is the path itself and
    pull / push do nothing."""

    def __init__(self, out: str):
        self.url = out if is_url(out) and not out.startswith("file://") else None
        if self.url is None:
            self.local = out[len("file://"):] if out.startswith("file://") else out
        else:
            key = hashlib.sha256(out.rstrip("/").encode()).hexdigest()[:16]
            self.local = os.path.join(cache_root(), "runs", key)
        self._pushed: Dict[str, Tuple[int, int]] = {}

    @property
    def checkpoints(self) -> str:
        """Where Orbax keeps the checkpoints: the URL's checkpoints/ (Orbax writes URLs itself) or local."""
        return join(self.url, "checkpoints") if self.url else os.path.join(self.local, "checkpoints")

    def pull(self) -> None:
        """Make the staging folder what the URL holds of the run's own files: emptied, then the small files
        (metrics.jsonl, config.yaml, ...) copied down; not the checkpoints, not an exported model/."""
        if self.url is None:
            os.makedirs(self.local, exist_ok=True)
            return
        import shutil

        shutil.rmtree(self.local, ignore_errors=True)  # nothing of an earlier run at another state survives
        os.makedirs(self.local, exist_ok=True)
        self._pushed.clear()
        fs, p = filesystem(self.url)
        if not fs.exists(p):
            return
        root = p.rstrip("/") + "/"
        for name, info in fs.find(p, detail=True).items():
            rel = name[len(root):] if name.startswith(root) else name
            if rel.startswith(("checkpoints/", "checkpoints-damaged/", "model/")):
                continue
            dest = os.path.join(self.local, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            fs.get(name, dest)
            st = os.stat(dest)
            self._pushed[rel] = (st.st_size, st.st_mtime_ns)

    def push(self) -> None:
        """Upload the staging folder's files that changed since the last push (the checkpoints are already
        at the URL)."""
        if self.url is None:
            return
        fs, p = filesystem(self.url)
        for dirpath, _, files in os.walk(self.local):
            for f in files:
                src = os.path.join(dirpath, f)
                rel = os.path.relpath(src, self.local)
                st = os.stat(src)
                if self._pushed.get(rel) == (st.st_size, st.st_mtime_ns):
                    continue
                fs.put(src, p.rstrip("/") + "/" + rel.replace(os.sep, "/"))
                self._pushed[rel] = (st.st_size, st.st_mtime_ns)
