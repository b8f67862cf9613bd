"""Shared fixtures: session-scoped pools of gloo workers, one per world size."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from dist_pool import WorkerPool


@pytest.fixture(scope="session")
def pools() -> Iterator[Callable[[int], WorkerPool]]:
    """``pools(n)`` returns a live pool of ``n`` ranks, starting (or restarting) it on demand."""
    live: dict[int, WorkerPool] = {}

    def get(world_size: int) -> WorkerPool:
        pool = live.get(world_size)
        if pool is None or pool.broken:
            pool = live[world_size] = WorkerPool(world_size)
        return pool

    yield get
    for pool in live.values():
        pool.close()
