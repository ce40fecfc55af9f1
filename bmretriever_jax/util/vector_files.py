"""`bmr encode` outputs: vectors.npy [n, d] + ids.json [n], written and read as one pair.

Two renames cannot be one atomic step, so a pair is written under an exclusive lock on the folder's
`.vectors.npy.lock`: both files in full to temporary names (fsynced), then the old seal is removed, both
are renamed, and vectors.json (rows, dim, dtype, size + sha256 of both files) seals the new pair.
`read_vectors` takes the shared lock and checks the seal, so it never returns the vectors of one run with
the ids of another; a reader that opens the files itself can compare them with vectors.json.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Sequence, Tuple

import numpy as np

from bmretriever_jax.util.atomic import (atomic_path, atomic_write, check_record, check_writable_dir, file_lock,
                                    file_record, fsync_dir, remove_stale_temps)
from bmretriever_jax.util.errors import DataFormatError

VECTORS, IDS, SEAL = "vectors.npy", "ids.json", "vectors.json"


def write_vectors(out_dir: str, vectors, ids: Sequence[str]) -> str:
    """Write vectors [n, d] and their n ids into out_dir as one pair (see the module doc); return out_dir."""
    vectors = np.asarray(vectors)
    ids = [str(i) for i in ids]
    if vectors.ndim != 2 or vectors.shape[0] != len(ids):
        raise ValueError(f"write_vectors: {len(ids)} ids for vectors of shape {list(vectors.shape)}")
    check_writable_dir(out_dir)
    ids_path, vec_path, seal_path = (os.path.join(out_dir, n) for n in (IDS, VECTORS, SEAL))
    with file_lock(vec_path):
        remove_stale_temps(out_dir)
        # Both files are complete under temporary names before either is renamed, so a run killed while
        # writing (the slow part) leaves the previous pair sealed and readable.
        with atomic_path(ids_path) as ids_tmp, atomic_path(vec_path) as vec_tmp:
            with open(ids_tmp, "w") as f:
                json.dump(ids, f)
            with open(vec_tmp, "wb") as f:
                np.save(f, vectors)
            # Unseal just before the two renames: between them the folder says it is incomplete.
            with contextlib.suppress(FileNotFoundError):
                os.remove(seal_path)
                fsync_dir(out_dir)
        seal = {"rows": int(vectors.shape[0]), "dim": int(vectors.shape[1]), "dtype": str(vectors.dtype),
                "files": {name: file_record(os.path.join(out_dir, name)) for name in (IDS, VECTORS)}}
        with atomic_write(seal_path, "w") as f:
            json.dump(seal, f, indent=1)
    return out_dir


def read_vectors(out_dir: str, full: bool = False) -> Tuple[np.ndarray, list]:
    """-> (vectors [n, d], ids [n]) of a folder written by write_vectors; DataFormatError (one line) if the
    pair is incomplete or the files do not match their seal (sha256 rechecked when `full` or when a file
    changed since it was written)."""
    seal_path = os.path.join(out_dir, SEAL)
    if not os.path.isdir(out_dir):
        raise DataFormatError(f"{out_dir}: not a folder of encoded vectors")
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(file_lock(os.path.join(out_dir, VECTORS), shared=True))
        except OSError:  # a read-only copy of an output folder: nobody can be writing it
            pass
        try:
            with open(seal_path) as f:
                seal = json.load(f)
            files = seal["files"]
        except FileNotFoundError:
            raise DataFormatError(f"{seal_path}: missing: {out_dir} holds no complete vectors + ids pair "
                                  "(interrupted, or written by an older version)") from None
        except (ValueError, KeyError, TypeError):
            raise DataFormatError(f"{seal_path}: unreadable") from None
        for name in (IDS, VECTORS):
            reason = check_record(os.path.join(out_dir, name), files.get(name) or {}, full)
            if reason:
                raise DataFormatError(f"{os.path.join(out_dir, name)}: {reason}; does not match {SEAL}")
        vectors = np.load(os.path.join(out_dir, VECTORS))
        with open(os.path.join(out_dir, IDS)) as f:
            ids = json.load(f)
    if vectors.shape != (len(ids), seal.get("dim")):
        raise DataFormatError(f"{os.path.join(out_dir, VECTORS)}: shape {list(vectors.shape)} for {len(ids)} ids")
    return vectors, ids

