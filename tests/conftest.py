import pytest
import torch


@pytest.fixture
def one_thread():
    """Pins torch to one thread: results are bit-identical only for a given thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
