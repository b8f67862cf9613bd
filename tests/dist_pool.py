"""A pool of gloo worker processes that lives for the whole pytest session.

Starting a process group costs seconds per rank on this machine, so each world size is started
once and every multi-process check runs inside it. Workers never assert: they compute and return
results, the test process asserts. That way a failed check never leaves a peer stuck in a
collective. Every collective runs under the process-group timeout (``PG_TIMEOUT_S``), and the test
process waits for results at most ``CALL_TIMEOUT_S``; a pool that timed out is torn down and the
next call starts a fresh one.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from queue import Empty
from typing import Any

import torch.multiprocessing as mp

PG_TIMEOUT_S = 60
CALL_TIMEOUT_S = 240
_TESTS_DIR = str(Path(__file__).resolve().parent)
_ROOT_DIR = str(Path(__file__).resolve().parent.parent)

_MESHES: dict[tuple[int, int], Any] = {}


def worker_mesh(dp_shard: int, ep: int):
    """The ("dp_shard", "ep") mesh of this worker's world, built once per layout."""
    from ep_fsdp import build_mesh

    key = (dp_shard, ep)
    if key not in _MESHES:
        _MESHES[key] = build_mesh(ep=ep, dp_shard=dp_shard, device_type="cpu")
    return _MESHES[key]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_main(rank: int, world: int, init_method: str, tasks: Any, results: Any) -> None:
    for path in (_ROOT_DIR, _TESTS_DIR):
        if path not in sys.path:
            sys.path.insert(0, path)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=init_method,
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=PG_TIMEOUT_S),
    )
    while True:
        item = tasks.get()
        if item is None:
            break
        fn, args, kwargs = item
        try:
            results.put((rank, True, fn(*args, **kwargs)))
        except BaseException:  # noqa: BLE001 - report everything to the test process
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class WorkerPool:
    """``world_size`` gloo ranks waiting for functions to run."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        ctx = mp.get_context("spawn")
        init_method = f"tcp://127.0.0.1:{free_port()}"
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(
                target=_worker_main,
                args=(rank, world_size, init_method, self._tasks[rank], self._results),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for p in self._procs:
            p.start()
        self.broken = False

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on every rank; return the per-rank results in rank order.

        Raises ``AssertionError`` with the workers' tracebacks if any rank raised, and
        ``TimeoutError`` if the ranks did not all answer within ``CALL_TIMEOUT_S``.
        """
        if self.broken:
            raise RuntimeError("worker pool is broken; the fixture should have replaced it")
        for q in self._tasks:
            q.put((fn, args, kwargs))
        out: dict[int, Any] = {}
        errors: dict[int, str] = {}
        while len(out) + len(errors) < self.world_size:
            try:
                rank, ok, value = self._results.get(timeout=CALL_TIMEOUT_S)
            except Empty:
                self.close()
                raise TimeoutError(
                    f"{fn.__name__}: ranks {sorted(set(range(self.world_size)) - set(out) - set(errors))} "
                    f"did not answer within {CALL_TIMEOUT_S}s"
                ) from None
            (out if ok else errors)[rank] = value
        if errors:
            self.close()  # peers of a failed rank may have hit a collective timeout: start afresh
            detail = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
            raise AssertionError(f"{fn.__name__} failed on ranks {sorted(errors)}:\n{detail}")
        return [out[r] for r in range(self.world_size)]

    def close(self) -> None:
        self.broken = True
        for q in self._tasks:
            with contextlib.suppress(Exception):  # a queue of a dead worker may be closed
                q.put(None)
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
