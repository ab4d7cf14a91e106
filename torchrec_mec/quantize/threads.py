"""Stage 2 runs its numerics on one torch thread."""
from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def one_thread() -> Iterator[None]:
    """Runs the block with ``torch.set_num_threads(1)``, then restores the thread count.

    Stage 2's k-means and quantizer steps are thousands of small kernels (rows x a few dims):
    split over two threads, each waits at a barrier for the other, and on a busy machine that
    wait is a scheduler slice. Measured on the 600k-row planted file's tables (2-core machine,
    load 5): the budget allocator's estimates took 6.5x the CPU with 2 threads, and 3 MEC
    epochs 9x (M=1, K=64) to 15x (M=40, K=16) the wall time (docs/pipeline.md). One thread also
    makes the results independent of the caller's thread count.

    Example::

        >>> before = torch.get_num_threads()
        >>> with one_thread():
        ...     torch.get_num_threads()
        1
        >>> torch.get_num_threads() == before
        True
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
