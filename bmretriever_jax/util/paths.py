"""Where the shipped configs and small data sets are: one place for every module that needs them.

In a source checkout (or an editable install) they are the repository's `configs/` and `data/`; a wheel built by
`pip install .` carries copies inside the package (`bmretriever_jax/_shipped/`, see setup.py). `BMR_DATA_DIR`
points at another data folder (same layout: scifact/, pubmedqa_pqal/, medquad/, ...).
"""
from __future__ import annotations

import os

from bmretriever_jax.util.errors import InputPathError

_PKG = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # bmretriever_jax/ (this file is in util/)
_CANDIDATES = (os.path.join(_PKG, "_shipped"), os.path.dirname(_PKG))  # wheel copy, then the source tree


def _find(kind: str) -> str:
    for root in _CANDIDATES:
        path = os.path.join(root, kind)
        if os.path.isdir(path):
            return path
    raise InputPathError(f"the shipped {kind}/ folder is not installed (looked in {', '.join(_CANDIDATES)}); "
                         f"reinstall with `pip install .` from a clone"
                         + (", or set BMR_DATA_DIR to a data folder" if kind == "data" else ""))


def data_dir() -> str:
    """The shipped data folder, or $BMR_DATA_DIR."""
    env = os.environ.get("BMR_DATA_DIR")
    if env:
        if not os.path.isdir(env):
            raise InputPathError(f"BMR_DATA_DIR={env}: not a folder")
        return env
    return _find("data")


def configs_dir() -> str:
    """The shipped configs folder (quickstart.yaml, smoke.yaml, papers/)."""
    return _find("configs")


def shipped_data(*parts: str) -> str:
    """A path inside the shipped data folder (not checked: the caller reports a missing file with its name)."""
    return os.path.join(data_dir(), *parts)


def shipped_config(*parts: str) -> str:
    return os.path.join(configs_dir(), *parts)


def checkpoint_steps(root: str) -> list:
    """The steps saved under a run's local checkpoint folder (digit-named folders holding `state/`), oldest
    first; [] when there is none (and for gs:// folders, which this does not list). Reads the folder only (no jax, no Orbax), so status commands stay instant; Orbax's
    manager still decides which of them finished writing."""
    if not os.path.isdir(root):
        return []
    return sorted(int(d) for d in os.listdir(root) if d.isdigit() and os.path.isdir(os.path.join(root, d, "state")))
