"""Run every notebook's tests with `nbdev_test`, one notebook per test, in a fresh process each."""
import os
import subprocess

import pytest

from conftest import NBS, ROOT, tool

NOTEBOOKS = sorted(p for p in NBS.glob("*.ipynb") if not p.name.startswith(("_", ".")))
NOTEBOOK_TIMEOUT_S = 900


def test_notebooks_found():
    assert any(p.name == "00_core.ipynb" for p in NOTEBOOKS), f"no notebooks found in {NBS}"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook(nb, kelly_home):
    env = {**os.environ, "KELLY_HOME": str(kelly_home)}
    r = subprocess.run([tool("nbdev_test"), "--path", str(nb), "--do_print"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=NOTEBOOK_TIMEOUT_S)
    assert r.returncode == 0, f"nbdev_test failed for {nb.name}:\n{r.stdout[-6000:]}\n{r.stderr[-6000:]}"
