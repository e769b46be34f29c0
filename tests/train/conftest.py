from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _single_thread(one_thread: None) -> None:
    """Every test here runs on one torch thread (`one_thread` in tests/conftest.py says why)."""
