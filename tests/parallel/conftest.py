"""Run a function in several gloo processes on the CPU (torch.multiprocessing.spawn)."""

import os
import socket

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, size: int, port: int, fn, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size))
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def _spawn(fn, size: int, *args) -> None:
    mp.spawn(_entry, args=(size, _free_port(), fn, args), nprocs=size, join=True)


@pytest.fixture
def spawn():
    """spawn(fn, size, *args): fn(rank, *args) in `size` gloo processes; a failure in any fails the test."""
    return _spawn


@pytest.fixture(scope="module")
def spawn_module():
    """`spawn` for module-scoped fixtures."""
    return _spawn
