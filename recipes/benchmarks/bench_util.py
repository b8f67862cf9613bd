"""What the layer benchmarks share: a one-block model and the layer-shape arguments."""

from __future__ import annotations

import argparse
import random
import socket
from collections.abc import Iterator

import torch
import torch.nn as nn


class OneBlock(nn.Module):
    """``module`` as the one block of a model (``parallelize_moe`` shards ``layers`` elements)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList([module])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[0](x)


def add_layer_args(p: argparse.ArgumentParser, *, tokens_help: str | None = None) -> None:
    """``--dim --hidden-dim --experts --top-k --tokens --repeats --warmup`` with the benchmarks'
    defaults (D=256 H=512 E=8 k=2, 4096 tokens, 9 timed repeats after 2 warm-up ones)."""
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--hidden-dim", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--tokens", type=int, default=4096, help=tokens_help)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--warmup", type=int, default=2)


def shuffled_rounds(keys: list[str], rounds: int, seed: int = 0) -> Iterator[tuple[int, list[str]]]:
    """``(round, keys in a new order)`` for each round: interleaved timing with the order drawn
    anew every round (the same on every rank for one ``seed``).

    NOTE: in a fixed order the same row always runs right after the same other row, and on CPU
    that position alone moved a row by up to 10% here (the caches and allocator blocks it
    inherits), more than most changes being measured: two copies of one compiled layer timed
    1.23x and 1.13x of the floor in fixed order.
    """
    rng = random.Random(seed)
    for i in range(rounds):
        order = list(keys)
        rng.shuffle(order)
        yield i, order


def free_port() -> str:
    """A TCP port on 127.0.0.1 that is free now, for a one-process rendezvous (a fixed port may be
    taken by another job, or still held by this process's previous group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])
