"""Shared test setup: the repository root on sys.path (so plain `pytest` works too), one torch thread, and a
private mask-scan cache."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The tests run many tiny tensor ops; on a busy 2-core machine several threads are many times slower than
    one. The previous setting is restored at the end."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    """Mask-scan caches of the tests go to a temporary folder, never to the user's ~/.cache/masksplit."""
    patch = pytest.MonkeyPatch()
    patch.setenv("MASKSPLIT_CACHE", str(tmp_path_factory.mktemp("masksplit-cache")))
    yield
    patch.undo()
