"""Runs a function on N local ranks (torch.multiprocessing, gloo) and re-raises a rank's failure."""
import os
import socket
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_on_ranks(fn: Callable[..., Any], *args: Any, world_size: int = 2) -> None:
    """Calls ``fn(rank, world_size, *args)`` in ``world_size`` processes with a gloo group.

    ``fn`` must be importable (a module-level function); an exception on any rank fails the call
    with that rank's traceback.
    """
    mp.spawn(_entry, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True)
