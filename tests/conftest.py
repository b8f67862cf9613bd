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


@pytest.fixture(autouse=True)
def fused_kernels_stay_on() -> Iterator[None]:
    """No test may switch the fused CPU kernels off for the tests after it (a failed compile
    does that for the rest of the process): tests that provoke one patch the state themselves."""
    from ep_fsdp import _fused

    yield
    disabled, _fused._disabled = _fused._disabled, None
    assert disabled is None, f"the fused CPU kernels were switched off: {disabled}"
