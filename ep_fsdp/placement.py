"""Where each logical expert lives: the single source of expert ownership.

Legend: E experts of one MoE layer, ep expert-parallel ranks, G = E / ep local expert slots per rank.

A logical expert ``e`` (the id the router picks) is held by ep rank ``rank_of(e)`` in local slot
``slot_of(e)``. The experts' global ``[E, ...]`` weight tensors are ``Shard(0)`` over ``ep``, so
storage row ``p = rank * G + slot`` (the *physical* index) holds logical expert ``e`` with
``physical[e] == p``. The default placement is contiguous blocks (``physical[e] == e``: rank ``r``
holds experts ``[r*G, (r+1)*G)``). The router keeps logical ids; only the token dispatcher maps them
to ranks and slots through this map, so routing, balancing losses and per-expert statistics do not
depend on the placement.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

__all__ = ["ExpertPlacement"]


def _row(value: object) -> int:
    """A storage row given in ``physical``: an int (Python, numpy or a 0-dim integer tensor), not a
    bool or a float (which ``int()`` would truncate)."""
    try:
        if not isinstance(value, bool):
            return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        pass
    raise ValueError(f"ExpertPlacement: physical holds {value!r}; give storage rows as ints.")


class ExpertPlacement:
    """Map logical expert ids to ``(ep rank, local slot)``.

    Args:
        num_experts: ``E``.
        ep: number of expert-parallel ranks; must divide ``E``.
        physical: optional ``E`` ints, a permutation of ``0..E-1``: the storage row of each
            logical expert. Default: contiguous blocks (the identity).

    Example::

        p = ExpertPlacement.contiguous(8, ep=2)
        p.rank_of(5), p.slot_of(5)        # (1, 1)
        p.ranks()                         # [0, 0, 0, 0, 1, 1, 1, 1]
    """

    def __init__(self, num_experts: int, ep: int, physical: Sequence[int] | None = None) -> None:
        if isinstance(ep, bool) or not isinstance(ep, int) or ep < 1:
            raise ValueError(f"ExpertPlacement: ep must be a positive int, got {ep!r}; pass e.g. ep=2.")
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(
                f"ExpertPlacement: num_experts must be a positive int, got {num_experts!r}; pass e.g. num_experts=8."
            )
        if num_experts % ep != 0:
            raise ValueError(
                f"ExpertPlacement: num_experts={num_experts} must be divisible by ep={ep}; "
                f"choose ep from the divisors of {num_experts}."
            )
        self.num_experts = num_experts
        self.ep = ep
        self.experts_per_rank = num_experts // ep
        ids = list(range(num_experts)) if physical is None else [_row(p) for p in physical]
        if sorted(ids) != list(range(num_experts)):
            raise ValueError(
                f"ExpertPlacement: physical must be a permutation of 0..{num_experts - 1}, got {ids}; "
                "give each logical expert its own storage row."
            )
        self._physical = ids
        self._contiguous = ids == list(range(num_experts))
        self._device_tables: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def contiguous(cls, num_experts: int, ep: int) -> "ExpertPlacement":
        """Rank ``r`` holds logical experts ``[r*G, (r+1)*G)`` in order (the default)."""
        return cls(num_experts, ep)

    def physical(self, expert: int) -> int:
        """Storage row (``rank * G + slot``) of logical ``expert``."""
        if not 0 <= expert < self.num_experts:
            raise IndexError(f"ExpertPlacement: expert {expert!r} is not in 0..{self.num_experts - 1}.")
        return self._physical[expert]

    def rank_of(self, expert: int) -> int:
        """ep rank that holds logical ``expert``."""
        return self.physical(expert) // self.experts_per_rank

    def slot_of(self, expert: int) -> int:
        """Local slot of logical ``expert`` on its ep rank."""
        return self.physical(expert) % self.experts_per_rank

    def ranks(self) -> list[int]:
        """ep rank of every logical expert ``0..E-1``."""
        return [p // self.experts_per_rank for p in self._physical]

    def experts_on(self, rank: int) -> list[int]:
        """Logical experts held by ep ``rank``, in slot order."""
        if not 0 <= rank < self.ep:
            raise IndexError(f"ExpertPlacement: rank {rank!r} is not in 0..{self.ep - 1} (ep={self.ep}).")
        G = self.experts_per_rank
        return self.logical_rows()[rank * G:(rank + 1) * G]

    def logical_rows(self) -> list[int]:
        """The logical expert each storage row ``0..E-1`` holds (the inverse of :meth:`physical`)."""
        rows = [0] * self.num_experts
        for expert, row in enumerate(self._physical):
            rows[row] = expert
        return rows

    def physical_table(self, device: torch.device) -> torch.Tensor:
        """``[E]`` int64 on ``device``: storage row of each logical expert (cached per device)."""
        device = torch.device(device)
        table = self._device_tables.get(device)
        if table is None:
            table = torch.tensor(self._physical, dtype=torch.long, device=device)
            self._device_tables[device] = table
        return table

    def to_physical(self, expert_ids: torch.Tensor) -> torch.Tensor:
        """Logical ids (any shape) -> storage rows; a no-op for the contiguous placement."""
        if self.is_contiguous():
            return expert_ids
        return self.physical_table(expert_ids.device)[expert_ids]

    def locate(self, expert_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logical ids (any shape) -> ``(ep rank, local slot)`` tensors of the same shape."""
        physical = self.to_physical(expert_ids)
        return torch.div(physical, self.experts_per_rank, rounding_mode="floor"), physical % self.experts_per_rank

    def is_contiguous(self) -> bool:
        """Whether this is the default placement (``physical[e] == e``)."""
        return self._contiguous

    def to_dict(self) -> dict[str, object]:
        """JSON-ready record: ``ep``, the rank of each logical expert and its storage row."""
        return {"ep": self.ep, "ranks": self.ranks(), "physical": list(self._physical)}

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ExpertPlacement)
            and other.ep == self.ep
            and other._physical == self._physical
        )

    def __hash__(self) -> int:
        return hash((self.ep, tuple(self._physical)))

    def __repr__(self) -> str:
        return f"ExpertPlacement(num_experts={self.num_experts}, ep={self.ep}, ranks={self.ranks()})"

    def __getstate__(self) -> dict[str, object]:
        return {"num_experts": self.num_experts, "ep": self.ep, "physical": self._physical}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__(state["num_experts"], state["ep"], state["physical"])  # type: ignore[misc, arg-type]
