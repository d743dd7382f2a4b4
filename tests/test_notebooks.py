"""Run every notebook's tests, one notebook per test, in a fresh process each.

Each notebook runs through `tools/build_docs.py --process --force`: the cells `nbdev_test` runs (every code cell
but those flagged with settings.ini's `tst_flags`, e.g. `#| notest`), in order, in one IPython shell, stopping at
the first error, plus the `show_doc` cells nbdev adds for the docs. The executed notebook stays in `_proc/`, so
the docs site (tests/test_docs.py runs after this file; see conftest.py) shows every example's output without
running the notebooks a second time.
"""
import os
import subprocess
import sys

import pytest

from conftest import NBS, ROOT

NOTEBOOKS = sorted(p for p in NBS.glob("*.ipynb") if not p.name.startswith(("_", ".")))
NOTEBOOK_TIMEOUT_S = 900
BUILD_DOCS = ROOT/"tools"/"build_docs.py"


def test_notebooks_found():
    assert any(p.name == "00_core.ipynb" for p in NOTEBOOKS), f"no notebooks found in {NBS}"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook(nb, kelly_home):
    env = {**os.environ, "KELLY_HOME": str(kelly_home)}
    r = subprocess.run([sys.executable, str(BUILD_DOCS), "--process", str(nb), "--force"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=NOTEBOOK_TIMEOUT_S)
    assert r.returncode == 0, f"{nb.name} failed:\n{r.stdout[-6000:]}\n{r.stderr[-6000:]}"
