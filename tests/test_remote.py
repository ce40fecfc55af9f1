"""Remote paths (util/remote.py) against a local Google Cloud Storage emulator (gcp-storage-emulator, from
PyPI, in memory): a training run whose model, pairs and `out:` are gs:// URLs writes its checkpoints (Orbax,
through tensorstore), metrics and model to the bucket, resumes from it bit-identically, and matches the same
run on local paths; fetch() reuses its copy until the remote listing changes; a missing object is a one-line
error."""
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from bmretriever_jax.config import load_config
from bmretriever_jax.data.pairs import write_pairs
from bmretriever_jax.training import checkpoint as ckpt
from bmretriever_jax.training import train
from bmretriever_jax.util import remote, treeutil
from bmretriever_jax.util.errors import InputPathError
from hf_tiny import tiny_model_dir, tiny_pairs
from procs import free_port

BUCKET = "bmr-test"
# The emulator answers a download without the x-goog-generation header real GCS sends (tensorstore reads it:
# "Malformed StorageGeneration" otherwise); this launcher adds it and starts the emulator unchanged otherwise.
EMULATOR = """
import sys
import gcp_storage_emulator.handlers.objects as objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
    _download(request, response, storage, *args, **kwargs)
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:
        return
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))


objects.download = download
from gcp_storage_emulator.server import create_server  # noqa: E402  (its routes take the function above)

create_server("127.0.0.1", int(sys.argv[1]), in_memory=True, default_bucket=sys.argv[2]).run()
"""



@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """A GCS emulator on a free port; the env vars gcsfs and tensorstore read to talk to it."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", EMULATOR, str(port), BUCKET], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_CLOUD_PROJECT": "test",
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "BMR_CACHE": str(tmp_path_factory.mktemp("cache"))}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    for _ in range(100):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("the GCS emulator did not start")
    import gcsfs

    fs = gcsfs.GCSFileSystem(token="anon", project="test")
    yield fs
    proc.kill()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _cfg(model, pairs, out, *extra):
    return load_config(None, [f"model.name={model}", f"data.train=[{pairs}]", f"out={out}", "model.max_length=16",
                              "model.query_max_length=8", "train.global_batch_size=8", "train.log_every=1",
                              "train.warmup_steps=2", "train.lr=3e-3", "mesh.data=1", "model.dtype=float32",
                              "train.steps=4", "train.save_every=2", *extra])


def _params(ck_dir):
    _, state, _ = ckpt.restore_params_only(ck_dir)
    return treeutil.flatten(state["trainable"])


def test_fetch_copies_once_and_refreshes_on_change(gcs, tmp_path):
    gcs.pipe(f"{BUCKET}/f/a.txt", b"one")
    gcs.pipe(f"{BUCKET}/f/sub/b.txt", b"two")
    local = remote.fetch(f"gs://{BUCKET}/f")
    assert open(os.path.join(local, "sub", "b.txt")).read() == "two"
    stamp = os.path.getmtime(os.path.join(local, "a.txt"))
    assert remote.fetch(f"gs://{BUCKET}/f") == local and os.path.getmtime(os.path.join(local, "a.txt")) == stamp
    gcs.pipe(f"{BUCKET}/f/a.txt", b"changed")  # another size: fetched again
    assert open(os.path.join(remote.fetch(f"gs://{BUCKET}/f"), "a.txt")).read() == "changed"
    assert remote.fetch(str(tmp_path)) == str(tmp_path) and remote.fetch(f"file://{tmp_path}") == str(tmp_path)
    with pytest.raises(InputPathError, match="no such file or folder"):
        remote.fetch(f"gs://{BUCKET}/nothing-here")


def test_training_on_gs_urls_resumes_and_equals_local(gcs, tmp_path):
    model = tiny_model_dir(str(tmp_path / "model"), family="llama")
    pairs = str(tmp_path / "pairs.jsonl")
    write_pairs(pairs, tiny_pairs(24))
    gcs.put(model, f"{BUCKET}/models/tiny", recursive=True)
    gcs.put(pairs, f"{BUCKET}/data/pairs.jsonl")
    url_model, url_pairs, url_out = (f"gs://{BUCKET}/models/tiny", f"gs://{BUCKET}/data/pairs.jsonl",
                                     f"gs://{BUCKET}/runs/a")
    # local reference, uninterrupted
    ref = train(_cfg(model, pairs, tmp_path / "local"), quiet=True)
    # on the bucket: 2 steps (saved at step 2), stop, resume from the bucket for the other 2
    train(_cfg(url_model, url_pairs, url_out), quiet=True, max_steps_this_run=2)
    assert gcs.exists(f"{BUCKET}/runs/a/checkpoints/2") and gcs.exists(f"{BUCKET}/runs/a/metrics.jsonl")
    assert not os.path.exists(url_out.replace("gs://", ""))  # nothing written to a local folder named like it
    got = train(_cfg(url_model, url_pairs, url_out), quiet=True)
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    a, b = _params(str(tmp_path / "local" / "checkpoints")), _params(f"{url_out}/checkpoints")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(b[k]), np.asarray(a[k]), err_msg=k)
    rows = [json.loads(x) for x in gcs.cat(f"{BUCKET}/runs/a/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert gcs.exists(f"{BUCKET}/runs/a/model/model.safetensors") and gcs.exists(f"{BUCKET}/runs/a/config.yaml")
    assert f"gs://{BUCKET}/models/tiny" in gcs.cat(f"{BUCKET}/runs/a/config.yaml").decode()  # the URL, not the copy
