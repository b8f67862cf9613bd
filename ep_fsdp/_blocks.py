"""Cache-sized row blocks for multi-pass elementwise work on CPU.

A chain of eager ops over a large ``[N, F]`` tensor writes every intermediate to memory and reads
it back. Run over blocks of rows instead, each block's intermediates are still in cache when the
next op reads them. On a GPU, or under ``torch.compile`` (which fuses the chain itself), one block
covers all rows.
"""

from __future__ import annotations

import torch

__all__ = ["BLOCK_BYTES", "row_blocks"]

# Bytes of one block of the widest operand: about a core's L2 cache.
BLOCK_BYTES = 1 << 20


def row_blocks(N: int, device: torch.device, row_bytes: int) -> list[tuple[int, int]]:
    """``[start, end)`` ranges covering ``N`` rows on ``device``: blocks of about
    :data:`BLOCK_BYTES` (``row_bytes`` per row of the widest operand) on CPU in eager mode,
    else ``[(0, N)]``."""
    if device.type != "cpu" or torch.compiler.is_compiling() or N == 0:
        return [(0, N)]
    rows = max(1, BLOCK_BYTES // max(1, row_bytes))
    return [(s, min(s + rows, N)) for s in range(0, N, rows)]
