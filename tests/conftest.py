"""Shared test settings and fixtures."""

from collections.abc import Iterator

import pytest
import torch
from hypothesis import settings

# helpers/ holds shared checks: their asserts get pytest's detailed failure messages too
pytest.register_assert_rewrite("helpers")

# Torch's first call of an op can take far longer than hypothesis' default 200 ms deadline.
settings.register_profile("droppath", deadline=None)
settings.load_profile("droppath")


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """One intra-op thread: far faster than contended ones for tiny tensors on small machines."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    """Compiled code and recompile counters of one test do not leak into the next."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
