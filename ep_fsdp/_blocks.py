"""Cache-sized row blocks for multi-pass elementwise work on CPU.

A chain of eager ops over a large ``[N, F]`` tensor writes every intermediate to memory and reads
it back. Run over blocks of rows instead, each block's intermediates are still in cache when the
next op reads them. On a GPU, or under ``torch.compile`` (which fuses the chain itself), one block
covers all rows.
"""

from __future__ import annotations

import torch

__all__ = ["BLOCK_BYTES", "row_blocks"]

# Bytes of the widest operand per block and per intra-op thread: each thread's share of a block
# stays within about half of a core's L2 cache, and a block keeps every thread busy.
BLOCK_BYTES = 1 << 19


def row_blocks(N: int, device: torch.device, row_bytes: int) -> list[tuple[int, int]]:
    """``[start, end)`` ranges covering ``N`` rows on ``device``: on CPU in eager mode, blocks of
    about :data:`BLOCK_BYTES` times ``torch.get_num_threads()`` (``row_bytes`` per row of the
    widest operand); else ``[(0, N)]``.

    NOTE: measured on 2 threads (1 MiB blocks): 0.5-2 MiB blocks all gave the SwiGLU's gain,
    256 KiB blocks half of it (per-op overhead).
    """
    if device.type != "cpu" or torch.compiler.is_compiling() or N == 0:
        return [(0, N)]
    rows = max(1, BLOCK_BYTES * torch.get_num_threads() // max(1, row_bytes))
    return [(s, min(s + rows, N)) for s in range(0, N, rows)]
