"""Shared pytest fixtures for kelly's process, file and end-to-end tests."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT/"nbs"
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    "Path of a console script installed beside this Python (the venv's `nbdev_test`, `kelly`, ...)."
    p = BIN/name
    if not p.exists(): pytest.fail(f"{name} is not installed beside {sys.executable}; install kelly with its dev extras")
    return str(p)


@pytest.fixture(scope="session")
def kelly_home(tmp_path_factory):
    "A KELLY_HOME shared by the whole session: `$KELLY_TEST_HOME` when set (CI reuses built corpora), else a temp dir."
    home = Path(os.environ.get("KELLY_TEST_HOME") or tmp_path_factory.mktemp("kelly_home"))
    home.mkdir(parents=True, exist_ok=True)
    return home


def pytest_collection_modifyitems(session, config, items):
    "The docs tests run last: the site they build reuses the notebooks that tests/test_notebooks.py executed."
    items.sort(key=lambda item: Path(str(item.fspath)).name == "test_docs.py")
