from __future__ import annotations

from pathlib import Path

import pytest

from tests.train.helpers import make_store


@pytest.fixture(autouse=True)
def _single_thread(one_thread: None) -> None:
    """Every test here runs on one torch thread (`one_thread` in tests/conftest.py says why)."""


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic store, one per test module."""
    folder = tmp_path_factory.mktemp("acts") / "store"
    make_store(folder)
    return folder
