"""Save and load through torch.distributed.checkpoint, with an atomic commit."""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import shutil
import time
import warnings
from collections.abc import Collection, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from .. import __version__
from ..parallelize import get_layout
from ._format import (
    FORMAT_VERSION,
    METADATA_FILE,
    metadata_crc32,
    extra_path,
    file_crc32,
    is_complete,
    moe_layer_records,
    storage_permutations,
    structure_problem,
    aside_path,
    transformers_record,
    partial_path,
    read_metadata,
    state_dict_name,
    write_json_atomic,
)
from ._io import Crc32FileSystemWriter, MappedFileSystemReader, MappedFiles
from ._safe import (
    CheckpointCorruptError,
    CheckpointLoadError,
    CheckpointMismatchError,
    SafeLoadPlanner,
    UnsafeCheckpointError,
    load_extra,
    safe_metadata_load,
)

__all__ = ["save", "load", "latest", "list_checkpoints", "PendingSave", "read_metadata"]

# (the default group it was made for, the gloo group of background saves)
_ASYNC_GROUP: tuple[dist.ProcessGroup, dist.ProcessGroup] | None = None


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _gather(obj: Any) -> list[Any]:
    """``all_gather_object`` that also works without a process group."""
    if not _distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _collective_device() -> torch.device:
    """Where a tensor for a collective on the default group must live: the CPU when the group has
    a CPU backend (gloo), else the current accelerator (NCCL has no CPU side)."""
    if "cpu:" in dist.get_backend_config():
        return torch.device("cpu")
    accelerator = torch.accelerator.current_accelerator()
    if accelerator is None:
        return torch.device("cpu")
    return torch.device(accelerator.type, torch.accelerator.current_device_index())


def _any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on any rank: one all-reduce of one number (this rank's flag alone
    without a process group)."""
    if not _distributed():
        return flag
    t = torch.tensor([int(flag)], device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _if_any_failed(obj: Any, failed: bool, collective: bool = True) -> list[Any] | None:
    """Every rank's ``obj`` when ``failed`` holds on any rank, else ``None`` (the shared verdict:
    every rank gets the same answer).

    NOTE: the common case, no failure, costs one all-reduce of one number; ``all_gather_object``
    (sizes, then pickles) took 7x as long with 4 processes on 2 cores (8 ms), so the details are
    gathered only when some rank failed.
    """
    if not (collective and _distributed()):
        return [obj] if failed else None
    return _gather(obj) if _any_rank(failed) else None


def _error_text(error: BaseException | None) -> str | None:
    """The text a rank shares about its failure (None: it did not fail)."""
    return None if error is None else f"{type(error).__name__}: {error}"


def _raise_if_any(error: BaseException | None, api: str, kind: type[Exception] = RuntimeError,
                  errors: list[str | None] | None = None) -> None:
    """Make every rank raise if one failed, so no rank is left waiting in a collective (``kind``
    on the ranks that did not fail themselves). ``errors``: every rank's :func:`_error_text`,
    when the caller gathered them already (with other results)."""
    if errors is None:
        errors = _if_any_failed(_error_text(error), error is not None)
        if errors is None:
            return
    failed = {r: e for r, e in enumerate(errors) if e is not None}
    if failed:
        if error is not None and len(failed) == 1:
            raise error
        detail = "; ".join(f"rank {r}: {e}" for r, e in sorted(failed.items()))
        raise kind(f"{api} failed on rank(s) {sorted(failed)}: {detail}")


def _app_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def _param_records(model_sd: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
        for k, v in model_sd.items()
        if isinstance(v, torch.Tensor)
    }


def _layout_record(model: nn.Module) -> dict[str, int]:
    layout = get_layout(model)
    if layout is None:
        _, world = _rank_world()
        return {"world_size": world, "dp_shard": world, "ep": 1, "parallelized": False}
    return {"world_size": layout.world_size, "dp_shard": layout.dp_shard, "ep": layout.ep, "parallelized": True}


class PendingSave:
    """An asynchronous save in flight. ``wait()`` finishes it and commits it (collective: every
    rank must call it). Until then the checkpoint is invisible to :func:`latest` and :func:`load`."""

    def __init__(self, future: Future, commit: Any, path: Path) -> None:
        self._future = future
        self._commit = commit
        self.path = path
        self._result: Path | None = None

    def done(self) -> bool:
        """Whether the background write has finished (the commit still needs ``wait()``)."""
        return self._future.done()

    def wait(self) -> Path:
        """Block until every rank's write finished, then commit; returns the checkpoint path."""
        global _IN_FLIGHT
        if self._result is None:
            error: BaseException | None = None
            try:
                self._future.result()
            except BaseException as e:  # noqa: BLE001
                error = e
            finally:
                if _IN_FLIGHT is self:
                    _IN_FLIGHT = None
            _raise_if_any(error, "save (async)")
            self._result = self._commit()
        return self._result


# The asynchronous save not yet waited on (every rank has the same one: saves are collective).
_IN_FLIGHT: PendingSave | None = None


def save(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    step: int | None = None,
    extra: Any = None,
    keep_last: int | None = None,
    async_save: bool = False,
    metadata: dict[str, Any] | None = None,
) -> Path | PendingSave:
    """Save ``model`` (and ``optimizer``) as a distributed checkpoint at ``path``.

    Collective: every rank calls it. Each rank writes only its own shards (DCP); expert weights
    are stored as global ``[E, ...]`` tensors, so :func:`load` can reshard to any layout. ``extra``
    (any picklable object: data-loader state, RNG state, scheduler) is saved per rank and handed
    back to the same rank by :func:`load`.

    The checkpoint is written to ``.NAME.partial`` beside ``path`` and renamed to ``path`` only
    after every rank finished and the metadata (layout, expert owners, MoE configs, versions,
    file checksums) is written, so an interrupted save never looks complete.

    Args:
        path: checkpoint directory to create; must not exist yet (a good checkpoint is never
            overwritten).
        step: training step, recorded in the metadata and used to order checkpoints.
        extra: per-rank picklable object.
        keep_last: after committing, delete all but the newest ``keep_last`` complete checkpoints
            in ``path``'s parent directory.
        metadata: JSON-serialisable information (e.g. the training config) stored from rank 0 in
            ``ep_fsdp.json`` under ``"user"``; read it back with :func:`read_metadata`.
        async_save: write in a background thread (``dcp.async_save``) after staging the tensors
            to CPU; returns a :class:`PendingSave` whose ``wait()`` (collective) commits it.

    Returns the committed path, or a :class:`PendingSave` when ``async_save``.

    Example::

        ckpt.save(f"{out}/checkpoints/step_{step:08d}", model, optimizer, step=step,
                  extra={"rng": torch.get_rng_state()}, keep_last=3)
    """
    global _IN_FLIGHT
    path = Path(path)
    rank, world = _rank_world()
    if _IN_FLIGHT is not None:
        raise RuntimeError(
            f"save: the asynchronous save of {_IN_FLIGHT.path} is still in flight; call its wait() before "
            f"starting another save (to {path}). Two saves in flight would interleave their collectives."
        )
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"save: keep_last must be >= 1 or None, got {keep_last!r}.")
    # Every rank must take the same decision (a stale directory cache on one node must not split
    # the ranks), so the existence check and the preparation are agreed through collectives.
    if _any_rank(path.exists()) and not _any_rank(not (path.exists() and structure_problem(path) is None)):
        raise FileExistsError(
            f"save: {path} already exists; checkpoints are never overwritten. Save under a new name "
            "(e.g. step_{step:08d}) or delete the old one yourself."
        )
    tmp = partial_path(path)
    error: BaseException | None = None
    if rank == 0:
        try:
            if path.exists():  # not a usable checkpoint (checked above): kept aside, never deleted
                os.rename(path, aside_path(path, "broken"))
            if tmp.exists():  # left by an interrupted save: never a valid checkpoint
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        except BaseException as e:  # noqa: BLE001
            error = e
    _raise_if_any(error, "save")

    state = _app_state(model, optimizer)
    params = _param_records(state["model"])
    layout = _layout_record(model)
    moe = moe_layer_records(model, layout["ep"])
    hf = transformers_record(model)

    extra_error: BaseException | None = None
    try:
        if extra is not None:
            extra_path(tmp, rank).parent.mkdir(exist_ok=True)
            torch.save(extra, extra_path(tmp, rank))
    except BaseException as e:  # noqa: BLE001
        extra_error = e  # NOTE: reported by the commit's collective (one collective less per save)

    def commit() -> Path:
        # NOTE: every phase reports its failure through a collective, so no rank is left waiting.
        manifest: dict[str, dict[str, int]] = {}
        error: BaseException | None = extra_error
        if error is None:
            try:
                own = sorted(tmp.glob(f"__{rank}_*.distcp"))
                if extra is not None:
                    own.append(extra_path(tmp, rank))
                manifest = {p.relative_to(tmp).as_posix(): _file_record(p, writer.crcs) for p in own}
            except BaseException as e:  # noqa: BLE001
                error = e
        gathered = _gather((manifest, _error_text(error)))  # NOTE: one collective for both
        manifests = [m for m, _ in gathered]
        _raise_if_any(error, "save", errors=[e for _, e in gathered])
        if rank == 0:
            try:
                _write_metadata_and_rename(manifests)
            except BaseException as e:  # noqa: BLE001
                error = e
        _raise_if_any(error, "save")
        return path

    def _write_metadata_and_rename(manifests: list[dict[str, dict[str, int]]]) -> None:
        files = {k: v for m in manifests for k, v in m.items()}
        dcp_meta = tmp / ".metadata"
        files[".metadata"] = {"bytes": dcp_meta.stat().st_size, "crc32": file_crc32(dcp_meta)}
        meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "layout": layout,
            "moe_layers": moe,
            "params": params,
            "has_optimizer": optimizer is not None,
            "extra_ranks": [r for r, m in enumerate(manifests) if any(k.startswith("extra/") for k in m)],
            "files": files,
            "versions": {"ep_fsdp": __version__, "torch": torch.__version__},
            "user": metadata,
        }
        if hf is not None:
            meta["transformers"] = hf
        meta["meta_crc32"] = metadata_crc32(meta)
        write_json_atomic(tmp / METADATA_FILE, meta)
        _fsync_dir(tmp)
        os.rename(tmp, path)
        _fsync_dir(path.parent)
        if keep_last is not None:
            try:
                older = list_checkpoints(path.parent)[:-keep_last]
            except OSError as e:  # the new checkpoint is committed: cleanup is best effort
                warnings.warn(f"save: keep_last could not list {path.parent}: {e}", stacklevel=2)
                older = []
            for old in older:
                if old != path:
                    # NOTE: renamed first (atomic): a kill during the removal leaves a dot-directory
                    # that is never taken for a checkpoint, not a half-deleted one that looks complete
                    doomed = old.with_name(f".{old.name}.deleting.{os.getpid()}")
                    try:
                        os.rename(old, doomed)
                        shutil.rmtree(doomed, ignore_errors=True)
                    except OSError as e:  # the new checkpoint is committed: cleanup is best effort
                        warnings.warn(f"save: keep_last could not remove {old}: {e}", stacklevel=2)

    # NOTE: the shard files' CRC32s are taken while they are written (a second read of every file
    # would cost about a tenth of the save)
    writer = Crc32FileSystemWriter(tmp)
    if async_save:
        future = dcp.async_save(state, storage_writer=writer, process_group=_async_group())
        _IN_FLIGHT = PendingSave(future, commit, path)
        return _IN_FLIGHT
    # raises on every rank if any rank failed to write
    with _quiet_single_process(), _without_zip_crcs():
        dcp.save(state, storage_writer=writer, no_dist=not _distributed())
    return commit()


@contextlib.contextmanager
def _without_zip_crcs() -> Iterator[None]:
    """``torch.save`` without the CRC32 of every zip record it writes, for the block.

    NOTE: that CRC costs about a sixth of a save to a fast disk (~6 GB/s), torch.load never checks
    it, and the CRC32 taken while writing covers every byte of each file. The setting is
    process-wide, so only a synchronous save turns it off (a background one would leave it off
    while training runs); it is restored after.
    """
    from torch.serialization import get_crc32_options, set_crc32_options

    previous = get_crc32_options()
    set_crc32_options(False)
    try:
        yield
    finally:
        set_crc32_options(previous)


def _file_record(path: Path, written: dict[str, tuple[int, int]]) -> dict[str, int]:
    """``{"bytes", "crc32"}`` of a file just written: the CRC32 taken while writing it when there
    is one for this size, else read back."""
    size = path.stat().st_size
    seen = written.get(path.name)
    return {"bytes": size, "crc32": seen[1] if seen is not None and seen[0] == size else file_crc32(path)}


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns that it assumes a single process when there is no process group: we mean it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _async_group() -> dist.ProcessGroup | None:
    """A gloo group of its own for background saves, so they never interleave with training
    collectives on the default group; with the default group's timeout (a rank stuck in its
    background write fails the others' ``wait()`` after the job's timeout, not gloo's 30 minutes),
    made again when the default group was re-created."""
    global _ASYNC_GROUP
    if not _distributed():
        return None
    default = dist.distributed_c10d._get_default_group()
    if _ASYNC_GROUP is None or _ASYNC_GROUP[0] is not default:
        timeout = _group_timeout(default)
        _ASYNC_GROUP = (default, dist.new_group(backend="gloo", **({"timeout": timeout} if timeout else {})))
    return _ASYNC_GROUP[1]


def _group_timeout(group: dist.ProcessGroup) -> datetime.timedelta | None:
    """The collective timeout ``group`` was created with (None when its backend does not say)."""
    for device in ("cpu", "cuda"):
        try:
            return group._get_backend(torch.device(device)).options._timeout
        except (RuntimeError, AttributeError, ValueError):
            continue
    return None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_RANK_FILE = re.compile(r"^(?:__(\d+)_\d+\.distcp|extra/rank_(\d+)\.pt)$")


def _checker(name: str, index: int, world: int) -> int:
    """The rank that checks the CRC32 of file ``name`` (``index`` in sorted order): the rank that
    wrote it (modulo ``world``), other files round-robin.

    NOTE: in a load on the saving layout that is the rank that reads the file, so the check and the
    read go over the same mapped pages: the file is read from disk (or page cache) once.
    """
    m = _RANK_FILE.match(name)
    return int(m.group(1) or m.group(2)) % world if m else index % world


def _checked_here(meta: dict[str, Any], collective: bool = True) -> dict[str, int]:
    """``{file: expected CRC32}`` of the files this rank checks (:func:`_checker`); all of them
    when not ``collective``."""
    rank, world = _rank_world() if collective else (0, 1)
    return {name: rec["crc32"] for i, (name, rec) in enumerate(sorted(meta["files"].items()))
            if _checker(name, i, world) == rank}


def _file_problems(path: Path, meta: dict[str, Any], files: MappedFiles, collective: bool = True,
                   deferred: frozenset[str] = frozenset()) -> list[str]:
    """This rank's findings: sizes of all files; CRC32 of its 1/world share (of all files when not
    ``collective``), each file checked by :func:`_checker` over its mapping in ``files``, which the
    caller then reads the tensors from; files in ``deferred`` are checked later, while they are read.
    Never raises: every problem is a line for the shared verdict."""
    rank, world = _rank_world() if collective else (0, 1)
    problems = []
    for i, (name, rec) in enumerate(sorted(meta["files"].items())):
        f = path / name
        try:
            if not f.is_file():
                problems.append(f"{name} is missing")
                continue
            size = f.stat().st_size
            if size != rec["bytes"]:
                problems.append(f"{name} has {size} bytes, expected {rec['bytes']} (truncated or replaced)")
            elif (_checker(name, i, world) == rank and name not in deferred
                  and (problem := files.crc_problem(name, rec["crc32"]))):
                problems.append(problem)
        except (OSError, ValueError) as e:  # NOTE: reported through the shared verdict, never raised alone
            problems.append(f"{name} cannot be read ({e})")
    return problems


def _raise_damaged(path: Path, api: str, problems: list[str]) -> None:
    """:class:`CheckpointCorruptError` (a ``ValueError``) naming every damaged file, if any."""
    if problems:
        raise CheckpointCorruptError(
            f"{api}: checkpoint {path} is damaged: " + "; ".join(sorted(set(problems)))
            + ". Nothing was read into the model; use an earlier checkpoint "
            "(ep_fsdp.checkpoint.list_checkpoints(root))."
        )


def _verify_files(path: Path, meta: dict[str, Any], api: str = "load", collective: bool = True,
                  files: MappedFiles | None = None) -> None:
    """Sizes and CRC32s of a checkpoint's files (see :func:`_file_problems`), the verdict shared by
    every rank when ``collective``; raises :class:`CheckpointCorruptError` naming every damaged file."""
    problems = _file_problems(path, meta, files if files is not None else MappedFiles(path), collective)
    _raise_damaged(path, api, [p for ps in _if_any_failed(problems, bool(problems), collective) or [] for p in ps])


def _checked_extra(path: Path, meta: dict[str, Any], files: MappedFiles,
                   deferred: frozenset[str] = frozenset()) -> Any:
    """Check the files (:func:`_file_problems`) and read this rank's extra, with one verdict
    shared by every rank: all raise, or none does.

    NOTE: a rank checks its own extra's CRC32 itself (see :func:`_checker`), so it is never
    unpickled (``weights_only``) before it passed; a refused extra fails every rank.
    """
    rank, _ = _rank_world()
    problems = _file_problems(path, meta, files, deferred=deferred)
    extra, refusal = None, None
    extra_file = extra_path(path, rank)
    # NOTE: only an extra the manifest lists (its size and CRC32 were checked); another file put there is not read
    if not problems and extra_file.relative_to(path).as_posix() in meta["files"]:
        try:
            extra = load_extra(extra_file)
        except Exception as e:  # noqa: BLE001 - refused, unreadable or undecodable: shared below
            refusal = e  # NOTE: raised on every rank, or the others would wait in the next collective
    verdicts = _if_any_failed((problems, None if refusal is None else f"{type(refusal).__name__}: {refusal}"),
                              bool(problems) or refusal is not None)
    if verdicts is None:
        return extra
    _raise_damaged(path, "load", [p for ps, _ in verdicts for p in ps])
    if isinstance(refusal, (UnsafeCheckpointError, CheckpointLoadError)):  # raised as themselves
        raise refusal
    refused = {r: msg for r, (_, msg) in enumerate(verdicts) if msg is not None}
    if refused:
        detail = "; ".join(f"rank {r}: {m}" for r, m in sorted(refused.items()))
        raise CheckpointLoadError(f"load failed on rank(s) {sorted(refused)}: {detail}") from refusal
    return extra


def _check_model_matches(path: Path, meta: dict[str, Any], model_sd: dict[str, Any], model: nn.Module) -> None:
    saved = meta["params"]
    expected = _param_records(model_sd)
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    shapes = [
        f"{k}: model {expected[k]['shape']} vs checkpoint {saved[k]['shape']}"
        for k in sorted(set(expected) & set(saved))
        if expected[k]["shape"] != saved[k]["shape"]
    ]
    # Only fields that shape tensors must agree; routing options and loss coefficients may change.
    structural = ("dim", "hidden_dim", "num_experts", "expert_bias")
    moe_now = {n: {f: r["config"].get(f) for f in structural} for n, r in moe_layer_records(model).items()}
    moe_saved = {n: {f: r["config"].get(f) for f in structural} for n, r in meta["moe_layers"].items()}
    configs = [
        f"{name}.{field}: model {moe_now[name][field]!r} vs checkpoint {moe_saved[name][field]!r}"
        for name in sorted(set(moe_now) & set(moe_saved))
        for field in moe_now[name]
        if moe_now[name][field] != moe_saved[name].get(field)
    ]
    # NOTE: a plain transformers model has no expert-parallel layers: its checkpoint (experts in
    # logical order) loads into the model parallelized, and the other way round
    if set(moe_now) != set(moe_saved) and moe_now and moe_saved:
        configs.append(f"MoE layers: model {sorted(moe_now)} vs checkpoint {sorted(moe_saved)}")
    if missing or unexpected or shapes or configs:
        parts = []
        if missing:
            parts.append(f"missing from checkpoint: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"not in the model: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if shapes:
            parts.append(f"shape differs ({len(shapes)} tensors): " + "; ".join(shapes[:8]))
        if configs:
            parts.append("MoE config differs: " + "; ".join(configs[:8]))
        raise CheckpointMismatchError(
            f"load: checkpoint {path} was saved from a different model: " + " | ".join(parts)
            + f". Build the model with the checkpoint's configuration (python -m ep_fsdp.checkpoint info {path})."
        )


def load(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    verify_first: bool = False,
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save` into ``model`` (and ``optimizer``), resharding.

    Works on any layout (any world size, ``dp_shard``, ``ep``) and on a plain unparallelized
    model in a single process without a process group. Collective when distributed. Before any
    tensor is read it checks that the checkpoint is complete (files present, sizes), that DCP's
    index and this rank's ``extra`` are undamaged (CRC32) and that it comes from the same model
    (parameter names, shapes, MoE configs); on any of these failures it raises and leaves the
    model and optimizer untouched.

    The CRC32 of every tensor file is checked in the same pass that copies the tensors from it
    (each file by one rank; the verdict is shared): a damaged file makes every rank raise
    :class:`CheckpointCorruptError` naming it, but only after the copies, so the model and
    optimizer may then hold values from the damaged checkpoint: load another checkpoint into them
    (as ``recipes/train.py`` does) or rebuild them. ``verify_first=True`` checks every CRC32
    before any tensor moves (model and optimizer untouched on any failure), at the cost of one
    more pass over the files (from the page cache: about a fifth more load time).

    Each file is read once, through a mapping: tensors are decoded where they lie in it and
    copied straight into the model.

    Returns a dict with ``step``, ``extra`` (what this rank saved, or ``None``), ``layout`` (the
    layout it was saved on), ``moe_layers`` (configs and expert owners), ``versions`` and ``path``.

    Example::

        meta = ckpt.load(ckpt.latest(f"{out}/checkpoints"), model, optimizer)
        start_step = meta["step"] + 1
    """
    path = Path(path)
    meta = read_metadata(path, "load")
    if optimizer is not None and not meta["has_optimizer"]:
        raise CheckpointMismatchError(
            f"load: checkpoint {path} holds no optimizer state; call load(path, model) without an "
            "optimizer, or resume from a checkpoint saved with one."
        )
    # NOTE: checked on the model's state dict alone: building the optimizer's state dict would
    # initialise an empty optimizer's state, which a refused load must not do. The check is the
    # same on every rank (same metadata, same global shapes), so it needs no shared verdict.
    model_sd = get_model_state_dict(model)
    _check_model_matches(path, meta, model_sd, model)
    files = MappedFiles(path)
    # NOTE: the tensor files this rank checks are checked while it reads them (one pass), the
    # others (DCP's index, the extras: small) before anything is read
    check = {} if verify_first else {n: c for n, c in _checked_here(meta).items() if n.endswith(".distcp")}
    try:
        extra = _checked_extra(path, meta, files, deferred=frozenset(check))
        state = {"model": model_sd} if optimizer is None else _app_state(model, optimizer)
        dcp_load(state, path, no_dist=not _distributed(), files=files, check=check, manifest=meta["files"])
    finally:
        files.close()
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    _restore_placements(model, optimizer, meta)
    return {
        "step": meta["step"],
        "extra": extra,
        "layout": meta["layout"],
        "moe_layers": meta["moe_layers"],
        "versions": meta["versions"],
        "path": str(path),
    }


@torch.no_grad()
def _restore_placements(model: nn.Module, optimizer: torch.optim.Optimizer | None, meta: dict[str, Any]) -> None:
    """The loaded expert tensors are in the saved storage order. A parallelized model adopts the
    saved placement (the same permutation, under its own ep: every logical expert is where its
    row is); a plain model's rows (and optimizer moments) are put back in logical order."""
    from ..expert_modules import expert_layers
    from ..migration import install_placement

    if get_layout(model) is not None:
        moved = []
        for name, layer in expert_layers(model):
            name = state_dict_name(name)
            # NOTE: no record (a plain transformers model's checkpoint) or no placement in it (from
            # before placements were recorded): the rows are in logical order, the default
            rec = meta["moe_layers"].get(name) or {}
            before = layer.placement
            physical = (rec.get("placement") or {}).get("physical")
            install_placement(layer, physical or list(range(before.num_experts)))
            if layer.placement != before:
                moved.append(name)
        if moved and optimizer is None:
            warnings.warn(
                f"load: the experts of {moved[:4]} now sit where the checkpoint had them, not where this model "
                "had them; an optimizer that already holds state for this model still has its expert moments in "
                "the old order. Pass the optimizer to load (its state is then loaded and placed alike), or build "
                "the optimizer after loading.", stacklevel=3,
            )
        return
    params = dict(model.named_parameters())
    for key, physical in storage_permutations(meta).items():
        p = params.get(key)
        if p is None:
            continue
        index = torch.tensor(physical, device=p.device)
        for t in [p, *(optimizer.state.get(p, {}).values() if optimizer is not None else [])]:
            if isinstance(t, torch.Tensor) and t.shape[:1] == p.shape[:1] and t.dim() == p.dim():
                t.copy_(t[index])


def dcp_load(state: dict[str, Any], path: Path, *, no_dist: bool, files: MappedFiles | None = None,
             check: dict[str, int] | None = None, manifest: Collection[str] | None = None) -> None:
    """``dcp.load`` through the safe reader and planner: nothing in the checkpoint is unpickled
    beyond DCP metadata types and ``weights_only`` values (see ``_safe.py``). Reads through
    ``files`` (mappings the caller may have checked already), each tensor copied once into
    ``state``; ``.metadata`` is unpickled once. ``check`` (``{file: expected CRC32}``) names the
    files this rank checks in the same pass as it reads them (see :class:`MappedFileSystemReader`).

    Unless ``no_dist``, collective: every rank reads what its own ``state`` needs, then all share
    one verdict (all raise, or none does): a CRC32 mismatch found while reading is a
    :class:`CheckpointCorruptError` on every rank (``state`` may then hold values from the damaged
    file); otherwise a refusal (:class:`UnsafeCheckpointError`) or a :class:`CheckpointLoadError`
    is raised as itself on the rank that hit it, and as a :class:`CheckpointLoadError` on the others.
    """
    from torch.distributed.checkpoint.api import CheckpointException

    files = files if files is not None else MappedFiles(path)
    error: Exception | None = None
    reader: MappedFileSystemReader | None = None
    try:
        metadata = safe_metadata_load(bytes(files.view(".metadata")), str(path / ".metadata"), manifest)
        reader = MappedFileSystemReader(path, files, metadata, check)
        # NOTE: DCP's distributed load only gathers the ranks' read plans and scatters them back
        # unchanged (DefaultLoadPlanner has no global step): each rank plans and reads alone, and
        # the one collective is the verdict below.
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=str(path), storage_reader=reader, planner=SafeLoadPlanner(), no_dist=True)
    except (UnsafeCheckpointError, CheckpointLoadError) as e:
        error = e
    except CheckpointException as e:  # DCP wraps the read's error: surface a refusal as itself
        error = _unwrapped(e) or CheckpointLoadError(f"load: reading {path} failed: {str(e).strip()[:2000]}")
    except Exception as e:  # noqa: BLE001 - whatever the read hit, every rank must learn of it
        error = CheckpointLoadError(f"load: reading {path} failed: {type(e).__name__}: {e}")
    mine = (_error_text(error), reader.problems if reader else [])
    verdicts = _if_any_failed(mine, error is not None or bool(mine[1]), collective=not no_dist)
    if verdicts is None:
        return
    problems = sorted({p for _, ps in verdicts for p in ps})
    if problems:
        raise CheckpointCorruptError(
            f"load: checkpoint {path} is damaged: " + "; ".join(problems) + ". It was found while reading: the "
            "model and optimizer may hold values from it now; load an earlier checkpoint into them (or rebuild "
            "them) before use (ep_fsdp.checkpoint.list_checkpoints(root))."
        )
    if error is not None:
        raise error
    failed = {r: v for r, (v, _) in enumerate(verdicts) if v is not None}
    if failed:
        detail = "; ".join(f"rank {r}: {v}" for r, v in sorted(failed.items()))
        raise CheckpointLoadError(f"load: reading {path} failed on rank(s) {sorted(failed)}: {detail[:2000]}")


def _unwrapped(error: Exception) -> Exception | None:
    """The :class:`UnsafeCheckpointError` or :class:`CheckpointLoadError` inside DCP's
    ``CheckpointException``, if that is what it wraps."""
    for failure in getattr(error, "failures", {}).values():
        inner = failure[0] if isinstance(failure, tuple) else getattr(failure, "exception", failure)
        if isinstance(inner, (UnsafeCheckpointError, CheckpointLoadError)):
            return inner
    return None


def list_checkpoints(root: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints directly under ``root``, oldest first (by step, then name). A
    directory whose metadata is malformed, or whose files are missing or of the wrong size, is
    skipped (CRCs are checked when one is loaded), and so is one that cannot be read (e.g. a
    ``lost+found`` this process may not enter)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        try:
            if d.is_dir() and not d.name.startswith(".") and is_complete(d) and structure_problem(d) is None:
                step = read_metadata(d).get("step")
                found.append((step if step is not None else -1, d.name, d))
        except OSError:  # unreadable: not a checkpoint this process can use
            continue
    return [d for _, _, d in sorted(found)]


def latest(root: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint under ``root`` (highest step), or ``None``. Partial saves
    (``.NAME.partial``), directories without ``ep_fsdp.json`` and what does not verify
    structurally (see :func:`list_checkpoints`) are never returned."""
    found = list_checkpoints(root)
    return found[-1] if found else None

