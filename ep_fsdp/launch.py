"""Process-group start-up under torchrun, restarts included."""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist

__all__ = ["init_distributed", "exit_process", "is_peer_failure"]

# What gloo and NCCL say when a peer stopped participating: a timeout, or a connection it closed
# (a write to a dead peer's socket, a reconnect to a port nobody listens on any more, NCCL's remote
# error after a peer process exited).
_PEER_FAILURE_MARKERS = ("timed out", "application timeout", "operation timeout", "pair closure",
                         "connection reset", "connection closed", "broken pipe", "connection refused",
                         "socket closed", "remote process exited", "ncclremoteerror")


def init_distributed(timeout: datetime.timedelta = datetime.timedelta(minutes=5)) -> torch.device:
    """Initialise the default process group from torchrun's environment; return this rank's device.

    CUDA + NCCL when a GPU is available (the device is ``cuda:LOCAL_RANK``), else CPU + gloo.

    NOTE: with torch 2.13, a job restarted by ``torchrun --max-restarts`` re-uses the agent's store
    without a per-attempt prefix, so gloo's rendezvous reads the dead attempt's addresses and
    hangs. The store is therefore opened here and prefixed with ``TORCHELASTIC_RESTART_COUNT``.

    Example::

        device = ep_fsdp.init_distributed()      # under torchrun
        mesh = ep_fsdp.build_mesh(ep=2)
    """
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"init_distributed: environment variables {missing} are not set; launch with torchrun "
            "(e.g. torchrun --nproc-per-node 4 script.py)."
        )
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=not agent_store and rank == 0,
        timeout=timeout,
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"ep_fsdp/attempt_{attempt}", store)
    # NOTE: device_id binds NCCL's communicator to this rank's GPU at once (without it, NCCL's
    # barrier() guesses the device and warns that it did)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout,
                            device_id=device if device.type == "cuda" else None)
    return device


def exit_process(code: int = 0) -> None:
    """End a finished torchrun worker now: flush stdout/stderr and ``os._exit(code)``, skipping
    interpreter finalization.

    NOTE: call it after ``dist.destroy_process_group()``. During finalization torch 2.13's gloo
    threads may free work objects after Python is gone and abort the process ("terminate called
    without an active exception"), which torchrun reports as a failure of a run that succeeded.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def is_peer_failure(error: BaseException) -> bool:
    """Whether ``error`` (or an exception it wraps) is a collective that failed because another rank
    stopped participating: a collective timeout, or a connection the peer closed.

    Walks ``__cause__``/``__context__`` and DCP's ``CheckpointException`` failures, since a rank that
    stops during a save surfaces inside the checkpoint error. gloo reports a timeout as "Timed out
    waiting ..." or "Application timeout caused pair closure"; NCCL's watchdog says "timed out".
    """
    seen: set[int] = set()
    stack: list[BaseException] = [error]
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        # NOTE: a bad argument (ValueError, TypeError) is never a peer's failure, whatever it says
        # (e.g. "parallel.timeout_s must be > 0")
        if not isinstance(e, (ValueError, TypeError)) and any(m in str(e).lower() for m in _PEER_FAILURE_MARKERS):
            return True
        stack += [c for c in (e.__cause__, e.__context__) if c is not None]
        failures = getattr(e, "failures", None)  # DCP's CheckpointException: {rank: exception}
        if isinstance(failures, dict):
            for f in failures.values():  # an exception, an (exception, traceback) pair, or a wrapper
                f = f[0] if isinstance(f, tuple) and f else getattr(f, "exception", f)
                if isinstance(f, BaseException):
                    stack.append(f)
    return False
