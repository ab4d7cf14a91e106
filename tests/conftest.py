import pytest
import torch


def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """Pins torch to one thread: results are bit-identical only for a given thread count."""
    yield from _threads(1)


@pytest.fixture
def two_threads():
    """Pins torch to two threads (this machine's cores): CPU kernels split their work."""
    yield from _threads(2)
