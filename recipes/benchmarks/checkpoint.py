"""Checkpoint save/load/export throughput against plain file I/O of the same bytes, in the same run.

    torchrun --nproc-per-node 4 recipes/benchmarks/checkpoint.py --dir /tmp/ckpt_bench

Builds the reference MoE transformer at about ``--size-gb`` GB of float32 parameters, parallelizes
it on (dp_shard, ep) = (world/ep, ep), then alternates, ``--repeats`` times:
``ep_fsdp.checkpoint.save`` / ``load`` of the model, and each rank writing (with fsync) and reading
back its own local shards with plain ``open``/``write``/``readinto``; then rank 0 alone runs
``export_safetensors`` of that checkpoint against a plain copy of the checkpoint's files
(read + write + fsync of each; export fsyncs its files too). Rank 0 prints medians, GB/s
and the ratio (ep_fsdp time / plain time). The OS page cache serves the reads of all of them;
with ``--cold`` the files are evicted from it before every load and plain read (disk speed).
Within each pair the order alternates between repeats (the disk's speed depends on what was written
just before). Each repeat's files are deleted before the next one: the directory holds about 4x
``--size-gb``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

import ep_fsdp
from ep_fsdp.launch import exit_process
import ep_fsdp.checkpoint as ckpt
from ep_fsdp.models import MoETransformer, TransformerConfig


def local_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    return [(p.to_local() if hasattr(p, "to_local") else p).detach() for p in model.parameters()]


def plain_write(path: Path, tensors: list[torch.Tensor]) -> None:
    with open(path, "wb") as f:
        for t in tensors:
            f.write(t.contiguous().numpy().data)
        f.flush()
        os.fsync(f.fileno())


def plain_read(path: Path, tensors: list[torch.Tensor]) -> None:
    with open(path, "rb") as f:
        for t in tensors:
            f.readinto(t.numpy().data)


def plain_copy(src: Path, dst: Path, chunk: int = 16 << 20) -> None:
    """Read every file of checkpoint ``src`` and write it to ``dst``, fsync'd (the bytes export
    reads and writes), through one reused buffer."""
    buf = bytearray(chunk)
    view = memoryview(buf)
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        out = dst / f.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(f, "rb", buffering=0) as r, open(out, "wb") as w:
            while n := r.readinto(buf):
                w.write(view[:n])
            w.flush()
            os.fsync(w.fileno())


def evict(*paths: Path) -> None:
    """Drop the (clean, fsync'd) pages of these files, or of every file under these directories,
    from the page cache, so that the next read comes from the disk."""
    for path in paths:
        for f in (sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def on_rank0(fn) -> None:
    if dist.get_rank() == 0:
        fn()


def timed(fn) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=Path("/tmp/ep_fsdp_ckpt_bench"))
    p.add_argument("--size-gb", type=float, default=1.0)
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cold", action="store_true",
                   help="evict the files from the page cache before every read (load, plain read): disk speed")
    args = p.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    # experts dominate: 4 MoE layers of E=16 experts, D=1024; H sized to reach size_gb
    layers, E, D = 4, 16, 1024
    H = max(64, int(args.size_gb * 1e9 / 4 / (layers * E * 3 * D)) // 64 * 64)
    moe = ep_fsdp.MoEConfig(dim=D, hidden_dim=H, num_experts=E, top_k=2)
    cfg = TransformerConfig(vocab_size=256, dim=D, num_layers=layers, num_heads=8, max_seq_len=64, moe=moe)
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    ep_fsdp.parallelize_moe(model, ep_fsdp.build_mesh(ep=args.ep))
    total_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    tensors = local_tensors(model)
    if rank == 0:
        shutil.rmtree(args.dir, ignore_errors=True)
        args.dir.mkdir(parents=True)
    dist.barrier()
    names = ("save", "plain write", "load", "plain read", "export", "plain copy")
    times: dict[str, list[float]] = {k: [] for k in names}
    for i in range(args.repeats):
        path = args.dir / f"ckpt_{i}"
        plain = args.dir / f"plain_{i}_rank{rank}.bin"
        pairs = {
            "save": lambda: ckpt.save(path, model, step=i),
            "plain write": lambda: plain_write(plain, tensors),
            "load": lambda: ckpt.load(path, model),
            "plain read": lambda: plain_read(plain, tensors),
            "export": lambda: on_rank0(lambda: ckpt.export_safetensors(path, args.dir / f"hf_{i}")),
            "plain copy": lambda: on_rank0(lambda: plain_copy(path, args.dir / f"copy_{i}")),
        }
        for ours, ref in zip(names[::2], names[1::2]):
            # NOTE: the order within a pair alternates: the disk's speed depends on what was written before
            for name in (ours, ref) if i % 2 == 0 else (ref, ours):
                if args.cold and name in ("load", "plain read"):
                    evict(path, plain)
                times[name].append(timed(pairs[name]))
        dist.barrier()
        if rank == 0:  # NOTE: one repeat's files at a time keeps the directory at about 4x the model
            for name in (f"ckpt_{i}", f"hf_{i}", f"copy_{i}"):
                shutil.rmtree(args.dir / name, ignore_errors=True)
        plain.unlink()
        dist.barrier()
    if rank == 0:
        gb = total_bytes / 1e9
        print(f"model {gb:.2f} GB float32 ({E} experts x {layers} layers, D={D}, H={H}), world={world}, "
              f"ep={args.ep}, dir={args.dir}, medians of {args.repeats}, reads from "
              + ("the disk (--cold)" if args.cold else "the page cache"))
        print(f"{'operation':<8}{'ep_fsdp s':>11}{'GB/s':>8}{'plain s':>10}{'GB/s':>8}{'ratio':>8}  plain")
        for ours, ref in (("save", "plain write"), ("load", "plain read"), ("export", "plain copy")):
            a, b = statistics.median(times[ours]), statistics.median(times[ref])
            print(f"{ours:<8}{a:>11.2f}{gb / a:>8.2f}{b:>10.2f}{gb / b:>8.2f}{a / b:>7.2f}x  {ref}")
        shutil.rmtree(args.dir, ignore_errors=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_process()  # skips interpreter finalization (see ep_fsdp.launch.exit_process)
