"""Shared fixtures: session-scoped pools of gloo workers, one per world size."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from ckpt_utils import save_source
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


@pytest.fixture(scope="session")
def source(pools, tmp_path_factory) -> str:
    """Checkpoints saved on (dp_shard, ep) = (2, 2) after steps 1 (async) and 2, plus
    ``reference.pt`` with the global state after step 2 and the losses of steps 1-3."""
    root = str(tmp_path_factory.mktemp("ckpt"))
    pools(4).run(save_source, root)
    return root
