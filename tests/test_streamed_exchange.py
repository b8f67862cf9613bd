"""``parallelize_moe(dispatch_chunks=n)`` and ``dispatch_dtype``: the streamed exchange keeps the
numerics of one chunk; the bf16 wire halves the row bytes within a stated error bound."""

from __future__ import annotations

import pytest
import torch

import ep_fsdp
from parity_utils import REL_TOL
from test_parity import check, parity_step


@pytest.mark.parametrize(
    "layout,kind,options",
    [
        ((2, 2), "transformer", {"chunks": 2}),
        ((1, 4), "net", {"chunks": 4, "dedup": False}),
        ((1, 2), "transformer", {"chunks": 3, "ac": True}),
        # ranks with fewer tokens than chunks, and ranks with none: empty chunks still exchange
        ((1, 4), "net", {"chunks": 4, "grad_reduction": "sum", "sizes": [1, 2, 0, 13]}),
        ((2, 2), "transformer", {"chunks": 4, "grad_reduction": "sum", "sizes": [0, 6, 5, 5], "dedup": False}),
    ],
    ids=["dedup-2x2-n2", "plain-1x4-n4", "ac-1x2-n3", "empty-chunks-1x4-n4", "idle-rank-2x2-n4"],
)
def test_streamed_exchange_matches_single_process(pools, layout, kind, options):
    for r in pools(layout[0] * layout[1]).run(parity_step, *layout, kind, "random", **options):
        check(r)


def test_streamed_exchange_equals_one_chunk(pools):
    """The same step with 1, 2 and 4 chunks: the same loss and parameters, the same bytes."""
    pool = pools(4)
    runs = {n: pool.run(parity_step, 1, 4, "transformer", "random", chunks=n) for n in (1, 2, 4)}
    for n in (2, 4):
        for one, many in zip(runs[1], runs[n]):
            assert abs(one["loss"] - many["loss"]) <= REL_TOL * abs(one["loss"])
            assert many["rows_received"] == one["rows_received"]
            assert many["a2a_bytes"] == one["a2a_bytes"]  # each token still goes once to each rank


# Rows on a bf16 wire are rounded to 8 mantissa bits (unit roundoff u = 2**-9) on the way out and
# on the way back, and so are their gradients; everything else (gate weights, sums, experts) stays
# float32. The loss is then within a few u relative; gradients, which pass through both rounded
# exchanges and the experts' backward, within about 2**-5.
BF16_WIRE_LOSS_TOL = 4 * 2.0**-9
BF16_WIRE_GRAD_TOL = 2.0**-5


@pytest.mark.parametrize("dedup", [True, False], ids=["dedup", "plain"])
def test_bf16_wire_halves_the_bytes_within_the_bound(pools, dedup):
    pool = pools(4)
    exact = pool.run(parity_step, 2, 2, "transformer", "random", dedup=dedup)
    wire = pool.run(parity_step, 2, 2, "transformer", "random", dedup=dedup, wire_dtype=torch.bfloat16)
    for a, b in zip(exact, wire):
        check(a)
        assert abs(b["loss"] - b["loss_ref"]) <= BF16_WIRE_LOSS_TOL * abs(b["loss_ref"]), b
        assert b["grad"][1] <= BF16_WIRE_GRAD_TOL, b["grad"]
        assert b["grad"][1] > 0  # the rounding is real: the wire did carry bf16
    sent_exact, sent_wire = sum(r["a2a_bytes"] for r in exact), sum(r["a2a_bytes"] for r in wire)
    if dedup:  # rows halve; the 12-byte (row, slot, weight) records per slot do not
        assert sent_wire < 0.75 * sent_exact, (sent_wire, sent_exact)
    else:
        assert 2 * sent_wire == sent_exact, (sent_wire, sent_exact)


def test_bad_exchange_options_are_refused_by_name():
    model = torch.nn.Sequential(ep_fsdp.MoE(ep_fsdp.MoEConfig(dim=8, hidden_dim=8, num_experts=2, top_k=1)))
    with pytest.raises(ValueError, match=r"dispatch_chunks must be an int >= 1, got 0"):
        ep_fsdp.parallelize_moe(model, None, dispatch_chunks=0)  # checked before the mesh is used
    with pytest.raises(ValueError, match=r"dispatch_dtype must be None or one of .* got torch.int8"):
        ep_fsdp.parallelize_moe(model, None, dispatch_dtype=torch.int8)
