"""A real text corpus that exists on every machine, byte-level tokens, and a stateful loader.

The corpus is the source of the Python standard library of the running interpreter (``*.py`` files
under ``sysconfig``'s ``stdlib`` path), read in sorted path order. A file goes to the validation
split when a stable hash of its relative path falls under ``val_fraction``, so the split is
deterministic. Tokens are bytes (vocabulary 256).

Samples are non-overlapping windows of ``seq_len + 1`` bytes. :class:`GlobalBatchSampler` orders
the windows with a seeded permutation per epoch and cuts that order into *global* batches; rank
``r`` of ``world`` takes its slice of each global batch. Its state is the number of global batches
consumed, which does not depend on the number of ranks, so a run can resume on another layout at
the exact next sample as long as the global batch size stays the same.
"""

from __future__ import annotations

import sysconfig
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

__all__ = ["stdlib_corpus", "WindowDataset", "GlobalBatchSampler", "build_loader"]


def stdlib_corpus(max_bytes: int | None = None, val_fraction: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """``(train, val)`` uint8 arrays of the standard library's Python source.

    Files are taken in sorted order until ``max_bytes`` (per split, approximately) is reached.
    Test suites (``test/``, ``tests/``) and ``site-packages`` are left out.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"stdlib_corpus: val_fraction must be in (0, 1), got {val_fraction!r}.")
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py")
        if not ({"site-packages", "test", "tests", "idlelib", "__pycache__"} & set(p.relative_to(root).parts))
    )
    if not files:
        raise FileNotFoundError(f"stdlib_corpus: no Python files under {root}; is the standard library installed?")
    train: list[bytes] = []
    val: list[bytes] = []
    sizes = [0, 0]
    limit = max_bytes if max_bytes is not None else float("inf")
    for f in files:
        rel = str(f.relative_to(root))
        is_val = (zlib.crc32(rel.encode()) % 10_000) < val_fraction * 10_000
        target, i = (val, 1) if is_val else (train, 0)
        cap = limit * (val_fraction if is_val else 1.0)
        if sizes[i] >= cap:
            if sizes[0] >= limit and sizes[1] >= limit * val_fraction:
                break
            continue
        data = f.read_bytes() + b"\n\n"
        target.append(data)
        sizes[i] += len(data)
    return np.frombuffer(b"".join(train), dtype=np.uint8), np.frombuffer(b"".join(val), dtype=np.uint8)


class WindowDataset(Dataset):
    """Non-overlapping windows of ``seq_len + 1`` tokens: item ``i`` -> ``(input [L], target [L])``."""

    def __init__(self, tokens: np.ndarray, seq_len: int) -> None:
        if len(tokens) < seq_len + 1:
            raise ValueError(
                f"WindowDataset: {len(tokens)} tokens are fewer than one window of seq_len+1={seq_len + 1}; "
                "use a larger corpus (max_bytes) or a shorter seq_len."
            )
        self.tokens = torch.from_numpy(tokens.astype(np.int64))
        self.seq_len = seq_len

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = i * self.seq_len
        window = self.tokens[start:start + self.seq_len + 1]
        return window[:-1], window[1:]


class GlobalBatchSampler:
    """Batch sampler yielding this rank's indices of each global batch, forever (epoch after epoch).

    Stateful (``state_dict``/``load_state_dict``), so ``StatefulDataLoader`` checkpoints it. The
    state, ``{"consumed": global batches yielded, "seed": seed}``, is the same on every rank.
    """

    def __init__(self, num_samples: int, global_batch: int, rank: int, world: int, seed: int = 0) -> None:
        if global_batch % world != 0:
            raise ValueError(
                f"GlobalBatchSampler: global_batch={global_batch} is not divisible by world={world}; "
                f"use a multiple of {world}."
            )
        if num_samples < global_batch:
            raise ValueError(
                f"GlobalBatchSampler: {num_samples} samples are fewer than one global batch of {global_batch}; "
                "use a larger corpus or a smaller batch."
            )
        self.num_samples, self.global_batch = num_samples, global_batch
        self.rank, self.world, self.seed = rank, world, seed
        self.per_rank = global_batch // world
        self.batches_per_epoch = num_samples // global_batch
        self.consumed = 0

    def _order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=g)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, order = -1, None
        while True:
            e, b = divmod(self.consumed, self.batches_per_epoch)
            if e != epoch:
                epoch, order = e, self._order(e)
            start = b * self.global_batch + self.rank * self.per_rank
            self.consumed += 1
            yield order[start:start + self.per_rank].tolist()

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed, "seed": self.seed, "global_batch": self.global_batch,
                "num_samples": self.num_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position; the seed, global batch and data size must be those it was saved with."""
        for key in ("seed", "global_batch", "num_samples"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"GlobalBatchSampler: the saved data position was made with {key}={state[key]}, this "
                    f"run has {key}={getattr(self, key)}; resume with the same data settings (same seed, "
                    "global batch size, seq_len and corpus) or start a new run."
                )
        self.consumed = int(state["consumed"])


def build_loader(
    dataset: WindowDataset, global_batch: int, rank: int, world: int, seed: int = 0
) -> StatefulDataLoader:
    """A torchdata ``StatefulDataLoader`` over ``dataset`` with a :class:`GlobalBatchSampler`.

    Batches are ``(inputs [B, L], targets [B, L])`` with ``B = global_batch // world``.
    """
    sampler = GlobalBatchSampler(len(dataset), global_batch, rank, world, seed)
    return StatefulDataLoader(dataset, batch_sampler=sampler, num_workers=0)
