"""Every shipped config loads and validates (typos in a config are caught here, not on a pod)."""
import glob
import os

import pytest

from bmretriever_jax.config import RunConfig, load_config

ROOT = os.path.dirname(os.path.dirname(__file__))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))


def test_there_are_configs():
    assert len(CONFIGS) >= 7


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.relpath(p, ROOT) for p in CONFIGS])
def test_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.train.steps > 0 and cfg.train.global_batch_size > 0
    assert cfg.data.train, "a config must name its training data"


def test_overrides_win():
    cfg = load_config(os.path.join(ROOT, "configs", "quickstart.yaml"), ["train.steps=7", "lora.rank=4"])
    assert cfg.train.steps == 7 and cfg.lora.rank == 4
