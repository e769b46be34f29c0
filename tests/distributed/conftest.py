from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """The tests' tensors are tiny: with two intra-op threads on a busy 2-core machine each op waits
    for a descheduled thread (~10 ms), one thread is ~40x faster. Results are checked against runs
    made the same way (children get OMP_NUM_THREADS=1 too)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
