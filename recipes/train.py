"""Train the reference MoE language model with expert parallelism + FSDP2 (launch with torchrun).

    torchrun --nproc-per-node 4 recipes/train.py --config recipes/configs/tiny.toml --output-dir outputs/tiny

Running the same command again resumes from the newest complete checkpoint in
<output-dir>/checkpoints/ (on the same layout or another one). See docs/recipes.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import json
import math
import os
import pickle
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import MixedPrecisionPolicy

warnings.filterwarnings("ignore", message=".*set_vital.*")  # torchdata 0.11 with torch 2.13
sys.path.insert(0, str(Path(__file__).resolve().parent))
import ep_fsdp  # noqa: E402
import ep_fsdp.checkpoint as ckpt  # noqa: E402
from data import WindowDataset, build_loader, stdlib_corpus  # noqa: E402
from ep_fsdp.checkpoint._format import aside_path  # noqa: E402
from ep_fsdp.launch import exit_process, is_peer_failure  # noqa: E402
from ep_fsdp.expert_modules import expert_layers  # noqa: E402
from ep_fsdp.models import MoETransformer, TransformerConfig  # noqa: E402
from train_config import JobConfig, load_config  # noqa: E402


class UsageError(Exception):
    """A bad flag, config value or path: reported as one line naming it (no traceback), exit code 2."""


def parse_args(argv: list[str] | None = None) -> tuple[JobConfig, Path, int | None]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=Path(__file__).resolve().parent / "configs" / "tiny.toml")
    p.add_argument("--output-dir", type=Path, default=Path("outputs/tiny"))
    p.add_argument("--steps", type=int, help="train.steps")
    p.add_argument("--ep", type=int, help="parallel.ep")
    p.add_argument("--dp-shard", type=int, help="parallel.dp_shard (default world // ep)")
    p.add_argument("--seed", type=int, help="train.seed")
    p.add_argument("--log-every", type=int, help="log.log_every")
    p.add_argument("--checkpoint-every", type=int, help="checkpoint.every")
    p.add_argument("--stop-after", type=int, metavar="N",
                   help="leave after N steps in this run (e.g. a time-limited allocation), saving a checkpoint; "
                        "the schedule still targets train.steps and the next run resumes")
    p.add_argument("--resume-from", type=Path, metavar="PATH",
                   help="resume from this checkpoint (default: the newest one under <output-dir>/checkpoints "
                        "that loads, falling back to older ones)")
    p.add_argument("--set", action="append", default=[], metavar="TABLE.KEY=VALUE",
                   help="override any config key, e.g. --set train.lr=1e-3 (repeatable)")
    args = p.parse_args(argv)
    if args.stop_after is not None and args.stop_after <= 0:
        p.error(f"--stop-after must be a positive number of steps, got {args.stop_after}")
    overrides = list(args.set)
    for flag, key in (("steps", "train.steps"), ("ep", "parallel.ep"), ("dp_shard", "parallel.dp_shard"),
                      ("seed", "train.seed"), ("log_every", "log.log_every"),
                      ("checkpoint_every", "checkpoint.every")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    try:
        cfg = load_config(args.config, overrides)
        if not cfg.model.hf_path:  # (a transformers model's [model.moe] shapes are unused)
            cfg.model.moe.moe_config(cfg.model.dim)  # MoEConfig's own checks, now rather than at build time
    except (OSError, ValueError) as e:  # (tomllib's TOMLDecodeError is a ValueError)
        what = f"--config {args.config}: " if isinstance(e, OSError) or type(e).__name__ == "TOMLDecodeError" else ""
        # the config's names for the same options (MoEConfig's dim is the model's)
        message = str(e).replace("MoEConfig.dim", "model.dim").replace("MoEConfig.", "model.moe.")
        p.error(f"{what}{message} (see docs/recipes.md for the keys and flags)")
    if args.resume_from is not None and not args.resume_from.is_dir():
        p.error(f"--resume-from {args.resume_from} is not a directory; pass a checkpoint directory "
                "(e.g. <output-dir>/checkpoints/step_00000300), or leave it out to resume from the newest one")
    return cfg, args.output_dir, args.stop_after, args.resume_from


# ----------------------------------------------------------------------------------------- setup
def build_model(cfg: JobConfig) -> MoETransformer:
    """The model on the meta device: no memory until :func:`ep_fsdp.materialize` allocates shards."""
    m = cfg.model
    moe = m.moe.moe_config(m.dim)
    tcfg = TransformerConfig(
        vocab_size=m.vocab_size, dim=m.dim, num_layers=m.num_layers, num_heads=m.num_heads,
        num_kv_heads=m.num_kv_heads, max_seq_len=m.max_seq_len, num_dense_layers=m.num_dense_layers,
        dense_hidden_dim=m.dense_hidden_dim, moe=moe,
    )
    with torch.device("meta"):
        return MoETransformer(tcfg)


def build_hf_model(cfg: JobConfig, mesh: Any, mp: MixedPrecisionPolicy | None) -> torch.nn.Module:
    """A transformers MoE model from ``model.hf_path``: built on meta, parallelized, and only this
    rank's shards read from the directory (``ep_fsdp.hf.from_pretrained``). The recipe feeds bytes,
    so the vocabulary must hold 256 tokens."""
    import ep_fsdp.hf
    from transformers import AutoConfig

    path = Path(cfg.model.hf_path)
    vocab = AutoConfig.from_pretrained(path).vocab_size if (path / "config.json").is_file() else 256
    if vocab < 256:
        raise ValueError(
            f"model.hf_path={path}: vocab_size={vocab}, the recipe feeds bytes (token ids 0..255) and needs "
            "vocab_size >= 256; use a model with a larger vocabulary."
        )
    model = ep_fsdp.hf.from_pretrained(path, mesh, torch_dtype=torch.float32, mp_policy=mp,
                                       activation_checkpointing=cfg.train.activation_checkpointing,
                                       dispatch_chunks=cfg.parallel.dispatch_chunks,
                                       dispatch_dtype=cfg.parallel.wire_dtype)
    return model


# What the loop is doing, for the error a collective timeout turns into (see __main__).
PROGRESS: dict[str, Any] = {"step": 0, "phase": "setup", "timeout_s": None}


def load_newest(ckpt_dir: Path, resume_from: Path | None, model: torch.nn.Module,
                optimizer: torch.optim.Optimizer, rank: int) -> tuple[Path | None, dict[str, Any] | None]:
    """Load ``resume_from``, or the newest checkpoint under ``ckpt_dir`` that loads.

    * A checkpoint that fails to load (damaged, unsafe) is moved aside as ``.NAME.unloadable-*``
      (kept, never deleted, no longer a candidate: its step can be saved again) and the next older
      one is tried; with ``resume_from`` the error is raised instead.
    * A checkpoint of another model (``CheckpointMismatchError``: this config does not describe
      it) stops the job with that error and renames nothing.
    * Resuming from ``resume_from`` first moves the checkpoints under ``ckpt_dir`` with a later
      step aside (``.NAME.superseded-*``, kept): the run goes on from the chosen step, and its
      saves would collide with them (or a restart would pick them up).
    * So after a torchrun restart a checkpoint under ``ckpt_dir`` newer than ``resume_from`` was
      saved by this run: the newest one is used then, else ``resume_from`` again.

    Rank 0 decides (directory listings may differ across nodes on a network file system) and
    every rank tries the same checkpoints; loading is collective, so every rank fails alike."""
    plan: list[Any] = [None]
    if rank == 0:
        explicit = resume_from is not None
        if explicit:
            step = _step_of_checkpoint(resume_from)
            if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
                supersede_later(ckpt_dir, resume_from, step)  # before loading: see above
            else:  # restarted: this run's own newer checkpoint wins
                newest = ckpt.latest(ckpt_dir)
                newer = _step_of_checkpoint(newest) if newest is not None else None
                explicit = step is None or newer is None or newer <= step
        plan[0] = ([resume_from] if explicit else ckpt.list_checkpoints(ckpt_dir)[::-1], explicit)
    dist.broadcast_object_list(plan, src=0)
    candidates, explicit = plan[0]
    for path in candidates:
        try:
            meta = ckpt.load(path, model, optimizer)
        except ckpt.CheckpointMismatchError as e:
            if not ckpt.read_metadata(path)["has_optimizer"]:
                raise ValueError(
                    f"train: {path} holds the model's weights but no optimizer state, which a resumed run needs; "
                    "resume from a checkpoint saved by train.py, or start a new --output-dir."
                ) from None
            raise ValueError(
                f"train: {e} This run's config does not describe the model of {path}: run with the config it "
                f"was saved with (its train_config: python -m ep_fsdp.checkpoint info {path}), or pass another "
                "--output-dir to start a new run."
            ) from None
        except (ValueError, OSError, pickle.UnpicklingError, ckpt.CheckpointLoadError) as e:
            # NOTE: the checkpoint's contents are at fault (a timeout, a dead peer are not caught here)
            if explicit:
                raise
            if rank == 0:
                aside = aside_path(path, "unloadable")
                os.rename(path, aside)
                print(f"could not resume from {path} ({str(e).splitlines()[0][:300]}); moved it to {aside.name} "
                      "and falling back to the next older checkpoint", flush=True)
            dist.barrier()
            continue
        return path, meta
    if candidates:
        raise RuntimeError(f"train: none of the checkpoints under {ckpt_dir} could be loaded (see above); "
                           "pass --resume-from PATH, or move them away to start over.")
    return None, None


def _step_of_checkpoint(path: Path) -> int | None:
    """The step a checkpoint records (None when it records none or cannot be read: its load says why)."""
    try:
        return ckpt.read_metadata(path).get("step")
    except (ValueError, OSError):
        return None


def supersede_later(ckpt_dir: Path, resumed: Path, step: int | None) -> None:
    """Move the checkpoints under ``ckpt_dir`` saved after ``step`` aside (kept, never deleted)."""
    for path in ckpt.list_checkpoints(ckpt_dir):
        later = _step_of_checkpoint(path)
        if step is not None and later is not None and later > step and path.resolve() != resumed.resolve():
            aside = aside_path(path, "superseded")
            os.rename(path, aside)
            print(f"resuming from step {step}: moved the later {path.name} (step {later}) aside to {aside.name}",
                  flush=True)


# Settings the data position of a resumed run depends on (the sampler's order and sample count).
DATA_SETTINGS = ("train.seed", "train.seq_len", "train.global_batch_size", "data.max_bytes", "data.val_fraction")
# Settings a resumed run takes from its config, whatever the checkpoint's optimizer state says.
OPTIMIZER_SETTINGS = ("train.lr", "train.min_lr_ratio", "train.warmup_steps", "train.betas", "train.weight_decay",
                      "train.steps", "train.grad_accum_steps")


def _setting(config: dict[str, Any], dotted: str) -> Any:
    table, key = dotted.split(".")
    value = config.get(table, {}).get(key)
    return list(value) if isinstance(value, (list, tuple)) else value


def check_resume_settings(saved: dict[str, Any] | None, cfg: JobConfig, path: Path) -> list[str]:
    """Raise if a data setting differs from the checkpoint's config (on any layout); the
    optimizer and schedule settings that differ (they apply from the resumed step on)."""
    if not saved:
        return []
    now = cfg.to_dict()
    for name in DATA_SETTINGS:
        if _setting(saved, name) != _setting(now, name):
            raise ValueError(
                f"train: {name}={_setting(now, name)!r}, but {path} was saved with {name}={_setting(saved, name)!r}; "
                "the data position of a resumed run depends on it: resume with the saved value, or pass another "
                "--output-dir to start a new run."
            )
    return [f"{name} {_setting(saved, name)!r} -> {_setting(now, name)!r}"
            for name in OPTIMIZER_SETTINGS if _setting(saved, name) != _setting(now, name)]


def release_free_heap() -> None:
    """Give freed heap pages back to the OS (glibc ``malloc_trim``): the exchange buffers change
    size every step, and glibc would otherwise keep their pages, so resident memory creeps up
    (about 2% over 2,000 steps; recipes/benchmarks/soak.py). A no-op elsewhere."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM: Any = None


def claim_output_dir(out: Path, rank: int) -> Any:
    """Rank 0 makes sure ``out`` is a writable directory and takes an exclusive lock on it (held
    until the process ends, released by the OS even on SIGKILL); every rank raises the same error
    if it cannot, before any work is done."""
    error, handle = None, None
    if rank == 0:
        try:
            if out.exists() and not out.is_dir():
                raise RuntimeError(f"--output-dir {out} is a file; pass a directory")
            out.mkdir(parents=True, exist_ok=True)
            handle = open(out / ".lock", "a+")
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                raise RuntimeError(
                    f"--output-dir {out} is in use by another job ({handle.read().strip() or 'unknown'}); "
                    "give this job its own output directory, or stop the other one"
                ) from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {os.uname().nodename}")
            handle.flush()
        except OSError as e:
            error = f"--output-dir {out} cannot be used: {e}"
        except RuntimeError as e:
            error = str(e)
    verdict = [error]
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise UsageError(f"{verdict[0]}.")
    return handle


def injected_fault() -> tuple[str, int, int] | None:
    """Fault injection for tests and recipes/benchmarks/faults.py: ``EP_FSDP_FAULT=nan:STEP:RANK``
    puts a NaN into that rank's logits at that step; ``write_error:STEP:RANK`` makes that rank's
    storage writer fail in the middle of that step's save (once per output directory)."""
    spec = os.environ.get("EP_FSDP_FAULT", "")
    kind, _, rest = spec.partition(":")
    if kind not in ("nan", "write_error"):
        return None
    step, rank = rest.split(":")
    return (kind, int(step), int(rank))


@contextlib.contextmanager
def failing_storage(out: Path) -> Any:
    """The storage writer raises ``OSError`` (no space left) once: a disk failing mid-save."""
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    marker = out / ".injected_write_error"
    if marker.exists():
        yield
        return
    marker.touch()
    original = FileSystemWriter.write_data

    def write_data(self: Any, plan: Any, planner: Any) -> Any:
        raise OSError(28, "No space left on device (injected by EP_FSDP_FAULT)")

    FileSystemWriter.write_data = write_data  # type: ignore[method-assign]
    try:
        yield
    finally:
        FileSystemWriter.write_data = original  # type: ignore[method-assign]


def logits_of(output: Any) -> torch.Tensor:
    """``[B, S, V]`` logits of the reference model (a tensor) or of a transformers model (``.logits``)."""
    return output if isinstance(output, torch.Tensor) else output.logits


def lr_lambda(cfg: JobConfig):
    """Linear warmup to lr, then cosine decay towards lr * min_lr_ratio (reached after the last step)."""
    t = cfg.train

    def f(step: int) -> float:  # step = optimizer steps taken so far
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def _step_of(line: str) -> float:
    """The step of a metrics.jsonl line; infinity for a line that does not parse (dropped)."""
    try:
        return float(json.loads(line).get("step", math.inf))
    except (ValueError, AttributeError):
        return math.inf


class Metrics:
    """Rank 0's console line, metrics.jsonl and (when installed) TensorBoard."""

    def __init__(self, out: Path, rank: int, start_step: int = 0) -> None:
        self.rank = rank
        self.file = None
        self.tb = None
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            path = out / "metrics.jsonl"
            if path.is_file():  # a restart replays steps after its checkpoint: drop their old records
                kept = [line for line in path.read_text().splitlines() if _step_of(line) <= start_step]
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text("".join(line + "\n" for line in kept))
                os.replace(tmp, path)  # (a half-written last line from a killed run is dropped too)
            self.file = open(path, "a")
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                pass

    def write(self, record: dict[str, Any]) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def global_mean(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def global_max(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


@torch.no_grad()
def validate(model: torch.nn.Module, val_set: WindowDataset, cfg: JobConfig, device: torch.device) -> float:
    """Mean loss over the first ``val_batches`` global batches of the validation split."""
    model.eval()
    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = cfg.train.global_batch_size // world // cfg.train.grad_accum_steps
    losses = []
    for b in range(cfg.log.val_batches):
        first = (b * world + rank) * per_rank
        idx = [i % len(val_set) for i in range(first, first + per_rank)]
        x = torch.stack([val_set[i][0] for i in idx]).to(device)
        y = torch.stack([val_set[i][1] for i in idx]).to(device)
        losses.append(float(F.cross_entropy(logits_of(model(x)).flatten(0, 1), y.flatten())))
    model.train()
    return global_mean([sum(losses) / len(losses)], device)[0]


# ----------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    cfg, out, stop_after, resume_from = parse_args(argv)
    device = ep_fsdp.init_distributed(timeout=datetime.timedelta(seconds=cfg.parallel.timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    PROGRESS["timeout_s"] = cfg.parallel.timeout_s
    job_lock = claim_output_dir(out, rank)  # before any work: a bad or busy directory fails every rank now
    t = cfg.train
    ep = cfg.parallel.ep
    try:
        mesh = ep_fsdp.build_mesh(ep=ep, dp_shard=cfg.parallel.dp_shard or None, device_type=device.type)
    except ValueError as e:
        raise UsageError(f"--ep {ep} --dp-shard {cfg.parallel.dp_shard or 'auto'} (parallel.ep, parallel.dp_shard) "
                         f"do not fit this job of {world} processes: {e}") from e
    if t.global_batch_size % (world * t.grad_accum_steps) != 0:
        raise UsageError(
            f"train.global_batch_size={t.global_batch_size} must be divisible by world_size * grad_accum_steps "
            f"= {world} * {t.grad_accum_steps}; change one of them (--set train.global_batch_size=N)."
        )

    # model, optimizer, schedule
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if t.mixed_precision == "bf16" else None)
    if cfg.model.hf_path:
        model = build_hf_model(cfg, mesh, mp)
    else:
        model = build_model(cfg)
        ep_fsdp.parallelize_moe(model, mesh, mp_policy=mp, activation_checkpointing=t.activation_checkpointing,
                                dispatch_chunks=cfg.parallel.dispatch_chunks, dispatch_dtype=cfg.parallel.wire_dtype)
        # each rank allocates and initializes only its own shards; the values do not depend on the layout
        ep_fsdp.materialize(model, device, seed=t.seed)
    if cfg.parallel.compile:
        model.compile()  # in place: parameter and state_dict names unchanged
    torch.manual_seed(t.seed)  # router jitter and any other randomness: the same on every rank
    # each micro-batch's loss is divided by the number of micro-batches: so is the balancing gradient
    ep_fsdp.set_aux_loss_scale(model, 1.0 / t.grad_accum_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))

    # data: every rank builds the (small) corpus and reads its own slice of each global batch
    train_tokens, val_tokens = stdlib_corpus(cfg.data.max_bytes or None, cfg.data.val_fraction)
    train_set, val_set = WindowDataset(train_tokens, t.seq_len), WindowDataset(val_tokens, t.seq_len)
    micro_batch_global = t.global_batch_size // t.grad_accum_steps
    loader = build_loader(train_set, micro_batch_global, rank, world, seed=t.seed)

    # resume
    ckpt_dir = out / "checkpoints"
    start_step = 0
    rng_to_restore: dict[str, Any] | None = None
    resume, meta = load_newest(ckpt_dir, resume_from, model, optimizer, rank)
    if resume is not None:
        start_step = meta["step"]
        extra = meta["extra"]
        saved_cfg = (ckpt.read_metadata(resume).get("user") or {}).get("train_config")
        changed = check_resume_settings(saved_cfg, cfg, resume)
        same_layout = meta["layout"]["world_size"] == world and meta["layout"]["ep"] == ep and extra is not None
        same_accum = saved_cfg is None or saved_cfg["train"]["grad_accum_steps"] == t.grad_accum_steps
        if same_layout and same_accum:
            loader.load_state_dict(extra["loader"])
        else:
            # NOTE: the sampler's position is layout-independent (samples consumed, in micro-batches
            # of this run's size: the global batch is checked above), so it is rebuilt from the step
            loader.batch_sampler.load_state_dict({"consumed": start_step * t.grad_accum_steps})
        if same_layout:  # a new layout has other ranks: per-rank state does not carry over
            rng_to_restore = extra
            for n, m in expert_layers(model):
                m.routing.rebalance_load = (extra.get("rebalance_load") or {}).get(n)
        # NOTE: the schedule is a function of the step, and the optimizer's hyperparameters are the
        # config's (the checkpoint's param groups hold the saved ones): an unchanged config gives
        # the saved values bit for bit, a changed one applies from here on
        scheduler.last_epoch = start_step
        scheduler.base_lrs = [t.lr for _ in optimizer.param_groups]
        for group in optimizer.param_groups:
            group.update(initial_lr=t.lr, lr=t.lr * lr_lambda(cfg)(start_step), betas=t.betas,
                         weight_decay=t.weight_decay)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports
        if rank == 0 and changed:
            print(f"resuming with changed settings (they apply from step {start_step + 1}): " + ", ".join(changed),
                  flush=True)
        if rank == 0:
            old = meta["layout"]
            print(f"resumed from {resume} at step {start_step} (saved on world={old['world_size']} "
                  f"dp_shard={old['dp_shard']} ep={old['ep']}; now world={world} "
                  f"dp_shard={mesh['dp_shard'].size()} ep={ep})", flush=True)

    metrics = Metrics(out, rank, start_step)
    if rank == 0:
        n_params = sum(p.numel() for p in model.parameters())
        what = (f"model={type(model).__name__.removeprefix('FSDP')}" if cfg.model.hf_path
                else f"experts/layer={cfg.model.moe.num_experts}")
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        print(f"ep_fsdp train: world={world} dp_shard={mesh['dp_shard'].size()} ep={ep} device={device.type} "
              f"params={n_params / 1e6:.2f}M {what} "
              f"corpus={len(train_tokens) / 1e6:.1f}MB train / {len(val_tokens) / 1e6:.2f}MB val "
              f"steps {start_step}->{t.steps}", flush=True)

    pending: list[ckpt.PendingSave] = []

    def save(step: int) -> None:
        while pending:  # the previous asynchronous save must be committed first
            pending.pop().wait()
        extra = {
            "loader": loader.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            # this rank's expert load since the last rebalance (moe.rebalance_every): the next move
            # plans from it, so a resumed run moves the same experts
            "rebalance_load": {n: m.routing.rebalance_load for n, m in expert_layers(model)},
        }
        faulty = failing_storage(out) if fault == ("write_error", step, rank) else contextlib.nullcontext()
        with faulty:
            result = ckpt.save(ckpt_dir / f"step_{step:08d}", model, optimizer, step=step, extra=extra,
                               keep_last=cfg.checkpoint.keep_last, metadata={"train_config": cfg.to_dict()},
                               async_save=cfg.checkpoint.async_save)
        if isinstance(result, ckpt.PendingSave):
            pending.append(result)

    def step_optimizer(step: int) -> None:
        """The optimizer step and what follows it (bias updates, expert moves)."""
        nonlocal rebalanced
        optimizer.step()
        ep_fsdp.update_expert_bias(model)  # layers with moe.bias_update_rate > 0 (one all-reduce)
        rebalance = cfg.model.moe.rebalance_every
        if rebalance and step % rebalance == 0 and ep > 1:
            # the load of the global batch since the last move; weights and AdamW moments move
            ep_fsdp.rebalance_experts(model, optimizer)
            if rank == 0:
                report = ep_fsdp.last_rebalance(model)
                before = max(r["imbalance_before"] for r in report.values())
                after = max(r["imbalance_after"] for r in report.values())
                moved = sum(r["experts_moved"] for r in report.values())
                seconds = max(r["seconds"] for r in report.values())
                print(f"step {step:5d}  rebalance: imbalance {before:.2f} -> {after:.2f}, {moved} experts moved "
                      f"in {seconds * 1e3:.0f} ms", flush=True)
                rebalanced = report  # goes into the next metrics record
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    data_iter = iter(loader)
    rebalanced: dict[str, Any] | None = None
    nonfinite = 0
    fault = injected_fault()
    # NOTE: after iter(loader), which draws a base seed from the default generator: the restored
    # state is then exactly the saved one (expert dropout and jitter draw from it).
    if rng_to_restore is not None:
        torch.set_rng_state(rng_to_restore["rng_cpu"])
        if device.type == "cuda" and rng_to_restore.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(rng_to_restore["rng_cuda"], device)
    tokens_per_step = t.global_batch_size * t.seq_len
    last_step = t.steps if stop_after is None else min(t.steps, start_step + stop_after)
    for step in range(start_step + 1, last_step + 1):
        step_start = time.perf_counter()
        task_sum = aux_sum = 0.0
        PROGRESS.update(step=step, phase="forward/backward")
        for _ in range(t.grad_accum_steps):
            x, y = (v.to(device) for v in next(data_iter))
            logits = logits_of(model(x))
            if fault == ("nan", step, rank):  # fault injection (EP_FSDP_FAULT): a NaN in this rank's batch
                logits = logits * float("nan")
            task = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            # ep_fsdp.MoE: the value only (its gradient is attached to the layers); transformers
            # models: the live global-batch balancing loss, whose gradient flows from here
            aux = ep_fsdp.moe_aux_loss(model)
            ((task + aux) / t.grad_accum_steps).backward()
            task_sum += float(task.detach())
            aux_sum += float(aux.detach())
        # the global gradient norm (one all-reduce, read once): non-finite if any rank's loss or
        # gradient is, and then the same on every rank, so every rank skips the same step
        PROGRESS["phase"] = "gradient norm and optimizer step"
        grad_norm = float(ep_fsdp.clip_grad_norm_(model.parameters(), t.max_grad_norm))
        if not math.isfinite(grad_norm):
            nonfinite += 1
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if rank == 0:
                print(f"step {step:5d}  skipped: non-finite gradient norm ({grad_norm}), {nonfinite} in a row",
                      flush=True)
                metrics.write({"step": step, "skipped": "non-finite gradient norm", "grad_norm": str(grad_norm)})
            if nonfinite >= t.max_nonfinite:
                raise FloatingPointError(
                    f"train: {nonfinite} consecutive steps (up to {step}) had a non-finite gradient norm; stopping. "
                    f"Lower train.lr, check the data, or raise train.max_nonfinite (now {t.max_nonfinite})."
                )
        else:
            nonfinite = 0
            step_optimizer(step)
        PROGRESS["phase"] = "logging and validation"
        is_val_step = step % cfg.log.val_every == 0 or step == t.steps
        if step % cfg.log.log_every == 0 or is_val_step or step == start_step + 1:
            loss, aux_mean = global_mean([task_sum / t.grad_accum_steps, aux_sum / t.grad_accum_steps], device)
            routing = ep_fsdp.routing_stats(model)  # since the last logged step; resets the counters
            # per-layer means of the global balancing and z losses of this step's micro-batches
            balance = sum(r["balance_loss"] or 0.0 for r in routing.values()) / len(routing)
            coef = getattr(model.config, "router_aux_loss_coef", None) if cfg.model.hf_path else None
            if coef:  # transformers' loss, all layers pooled (a family without the coefficient has none)
                balance = aux_mean / coef
            z = sum(r["z_loss"] or 0.0 for r in routing.values()) / len(routing)
            step_time = time.perf_counter() - step_start
            mem = global_max(peak_memory_mb(device), device)
            record: dict[str, Any] = {
                "step": step, "loss": loss, "aux_loss": aux_mean, "balance_loss": balance, "z_loss": z,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": grad_norm if math.isfinite(grad_norm) else str(grad_norm),  # (JSON has no NaN)
                "tokens_per_s": tokens_per_step / step_time, "step_time_s": step_time,
                "load_imbalance": max(r["imbalance"] for r in routing.values()),
                "a2a_bytes": sum(r["a2a_bytes"] for r in routing.values()),
                "dropped_fraction": sum(r["dropped_fraction"] for r in routing.values()) / len(routing),
                "peak_memory_mb": mem,
                "expert_utilization": {k: v["utilization"] for k, v in routing.items()},
            }
            if is_val_step:
                record["val_loss"] = validate(model, val_set, cfg, device)
            if rebalanced is not None:
                record["rebalance"], rebalanced = rebalanced, None
            if rank == 0:
                metrics.write(record)
                val = f"  val {record['val_loss']:.4f}" if "val_loss" in record else ""
                print(f"step {step:5d}/{t.steps}  loss {loss:.4f}{val}  lr {record['lr']:.2e}  "
                      f"{record['tokens_per_s']:,.0f} tok/s  {step_time * 1e3:.0f} ms  "
                      f"bal {balance:.3f}  z {z:.3f}  imb {record['load_imbalance']:.2f}  "
                      + (f"drop {record['dropped_fraction']:.3f}  " if cfg.model.moe.capacity_factor else "")
                      + f"mem {mem:.0f} MB", flush=True)
        if step % cfg.checkpoint.every == 0 or step == last_step:
            PROGRESS["phase"] = "checkpoint save"
            save(step)
        if step % cfg.log.log_every == 0:
            release_free_heap()
    while pending:
        pending.pop().wait()
    if rank == 0 and start_step >= t.steps:
        print(f"nothing to do: the newest checkpoint is already at step {start_step} of {t.steps}", flush=True)
    elif rank == 0 and last_step < t.steps:
        again = ("run the command again without --resume-from to continue (with it, the run would start from "
                 "that checkpoint again)" if resume_from is not None else "run the same command again to continue")
        print(f"stopped after {last_step - start_step} steps (--stop-after), at step {last_step} of {t.steps}; "
              f"saved {ckpt_dir / f'step_{last_step:08d}'}: {again}", flush=True)
    metrics.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:
        # NOTE: one line per rank, no traceback (every rank finds the same problem); exit code 2, as
        # argparse's. Under torchrun --max-restarts it is still retried: torchrun restarts on any failure.
        print(f"train.py: error (rank {dist.get_rank() if dist.is_initialized() else 0}): {e}", file=sys.stderr)
        exit_process(2)
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)) or not is_peer_failure(e):
            raise
        # NOTE: a peer that stopped participating (stuck, stopped, dead) shows up as a collective
        # timeout; say where, and what happens next
        raise RuntimeError(
            f"train: step {PROGRESS['step']} ({PROGRESS['phase']}): a collective timed out after "
            f"parallel.timeout_s={PROGRESS['timeout_s']} s: another rank stopped participating. Under torchrun "
            f"--max-restarts the job restarts from the newest checkpoint. Cause: {str(e).strip()}"
        ) from e
    exit_process()  # skips interpreter finalization (see ep_fsdp.launch.exit_process)
