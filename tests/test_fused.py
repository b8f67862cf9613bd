"""The fused CPU kernels (torch.compile of the SwiGLU and the combine/gather segment sums):
numerics against the eager ops and a float64 reference, the layer with and without them, the
environment switch, and the fallback when compiling fails."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from ep_fsdp import _fused
from ep_fsdp.config import MoEConfig
from ep_fsdp.dispatch._ops import Segments, weighted_segment_sum
from ep_fsdp.dispatch.local import combine_sorted, gather_sorted, sort_slots
from ep_fsdp.experts import swiglu
from ep_fsdp.moe import MoE


@pytest.fixture
def kernel_calls(monkeypatch) -> Counter:
    """The fused kernels run at any size; counts each kernel's calls by function name."""
    monkeypatch.setattr(_fused, "FUSED_MIN_ELEMENTS", 1)
    monkeypatch.setattr(_fused, "FUSED_MIN_SOFTMAX_ELEMENTS", 1)
    monkeypatch.setattr(_fused, "_disabled", None)
    monkeypatch.delenv(_fused.ENV_SWITCH, raising=False)
    calls: Counter = Counter()
    real = _fused._Kernel.__call__

    def counting(self, *args):
        calls[self.fn.__name__] += 1
        return real(self, *args)

    monkeypatch.setattr(_fused._Kernel, "__call__", counting)
    return calls


def _layer_step(layer: MoE, x0: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
    """One forward+backward of ``layer`` on a copy of ``x0``: output, input and parameter gradients."""
    layer.zero_grad(set_to_none=True)
    x = x0.clone().requires_grad_()
    out = layer(x)
    out.backward(grad)
    return [out.detach(), x.grad] + [p.grad for p in layer.parameters()]


def _tolerance(dtype: torch.dtype, want: torch.Tensor) -> dict[str, float]:
    eps = torch.finfo(dtype).eps
    return {"rtol": 4 * eps, "atol": 4 * eps * float(want.abs().max())}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_swiglu_is_as_close_to_float64_as_the_eager_ops(kernel_calls, monkeypatch, dtype):
    """``silu(gate) * up`` and both gradients in one fused pass each: within a few roundings of
    the float64 values; in bf16 no farther from them than the eager chain (which rounds every
    intermediate to bf16, where the kernel rounds once)."""
    torch.manual_seed(3)
    gate0, up0, grad = (torch.randn(300, 48, dtype=dtype) * 3 for _ in range(3))

    def run() -> list[torch.Tensor]:
        gate, up = gate0.clone().requires_grad_(), up0.clone().requires_grad_()
        out = swiglu(gate, up)
        out.backward(grad)
        return [out.detach(), gate.grad, up.grad]

    fused = run()
    assert kernel_calls == {"_swiglu_forward": 1, "_swiglu_backward": 1}
    monkeypatch.setenv(_fused.ENV_SWITCH, "0")
    eager = run()
    assert kernel_calls == {"_swiglu_forward": 1, "_swiglu_backward": 1}  # the switch: no kernel ran
    gate, up = gate0.double().requires_grad_(), up0.double().requires_grad_()
    out = F.silu(gate) * up
    out.backward(grad.double())
    for got, old, want in zip(fused, eager, [out.detach(), gate.grad, up.grad]):
        torch.testing.assert_close(got.double(), want, **_tolerance(dtype, want))
        if dtype == torch.bfloat16:
            assert (got.double() - want).abs().max() <= (old.double() - want).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k", [2, 3])
def test_fused_gather_and_combine_equal_the_eager_segment_sums(kernel_calls, monkeypatch, dtype, top_k):
    """The dispatch's gather (backward: each token's copies summed) and the weighted combine
    (forward and both gradients) fused: equal to the eager segment sums to the last bit of the
    dtype (both sum in float32 in slot order), and to a float64 reference; an expert that
    receives no rows changes nothing."""
    torch.manual_seed(5)
    T, D, E = 37, 24, 6
    ids = torch.randint(0, E - 1, (T, top_k))  # expert E - 1 gets no rows
    sort = sort_slots(ids, E)
    assert sort.counts[E - 1] == 0
    x0 = torch.randn(T, D, dtype=dtype)
    w0 = torch.rand(T, top_k)
    grad_rows = torch.randn(T * top_k, D, dtype=dtype)
    grad_out = torch.randn(T, D, dtype=dtype)

    def run() -> list[torch.Tensor]:
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        rows = gather_sorted(x, sort)  # [S, D] in expert order
        rows.backward(grad_rows)
        y = rows.detach().requires_grad_()
        out = combine_sorted(y, w, sort, dtype)  # [T, D]
        out.backward(grad_out)
        return [rows.detach(), x.grad, out.detach(), y.grad, w.grad]

    fused = run()
    assert kernel_calls == {"_segment_sum": 2, "_segment_sum_backward": 1}  # gather backward, combine, its backward
    monkeypatch.setenv(_fused.ENV_SWITCH, "0")
    eager = run()
    for got, want in zip(fused, eager):
        torch.testing.assert_close(got, want, **_tolerance(dtype, want.float()))
    # float64: rows[i] is token sort_idx[i] // k; out[t] = sum_j w[t, j] * rows[inverse[t*k + j]]
    x, w, y = x0.double().requires_grad_(), w0.double().requires_grad_(), fused[0].double().requires_grad_()
    x[sort.sort_idx // top_k].backward(grad_rows.double())
    out = (y[sort.inverse].view(T, top_k, D) * w.unsqueeze(2)).sum(1)
    out.backward(grad_out.double())
    for got, want in zip(fused[1:], [x.grad, out.detach(), y.grad, w.grad]):
        torch.testing.assert_close(got.double(), want, **_tolerance(torch.float32 if got.dtype == torch.float32 else dtype, want))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted", [True, False])
def test_fused_ragged_segment_sums_equal_the_eager_ones(kernel_calls, monkeypatch, dtype, weighted):
    """Segments of uneven length (the exchanges' rows per token and slots per row), empty ones
    included: the fused sum and its backward equal the eager segment sums to the dtype's
    rounding; segments longer than MAX_RAGGED take the eager ops."""
    torch.manual_seed(11)
    lengths = torch.tensor([2, 0, 1, 3, 2, 0, 1, 1, 3, 2, 0])  # [R]
    N, R, D = int(lengths.sum()), lengths.numel(), 20
    order = torch.randperm(N)  # [N]
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(N)
    y0, w0 = torch.randn(N, D, dtype=dtype), torch.rand(N)
    grad = torch.randn(R, D, dtype=dtype)

    def run(seg: Segments) -> list[torch.Tensor]:
        y, w = y0.clone().requires_grad_(), w0.clone().requires_grad_()
        out = weighted_segment_sum(y, w if weighted else None, order, inverse, seg)  # [R, D]
        out.backward(grad)
        return [out.detach(), y.grad] + ([w.grad] if weighted else [])

    fused = run(Segments(R, lengths=lengths))
    assert kernel_calls == {"_ragged_segment_sum": 1, "_segment_sum_backward": 1}
    monkeypatch.setenv(_fused.ENV_SWITCH, "0")
    eager = run(Segments(R, lengths=lengths))
    for got, want in zip(fused, eager):
        torch.testing.assert_close(got, want, **_tolerance(dtype, want.float()))
    assert torch.count_nonzero(fused[0][lengths == 0]) == 0
    monkeypatch.delenv(_fused.ENV_SWITCH)
    monkeypatch.setattr(_fused, "MAX_RAGGED", 2)  # the longest segment has 3 rows: eager forward
    kernel_calls.clear()
    run(Segments(R, lengths=lengths))
    assert kernel_calls == {"_segment_sum_backward": 1}


def test_fused_router_softmax_equals_torch_softmax(kernel_calls, monkeypatch):
    """The router's softmax over a narrow last dim, fused both ways: equal to ``torch.softmax``
    and its gradient to float32 rounding; below FUSED_MIN_SOFTMAX_ELEMENTS scores it is
    ``torch.softmax`` itself."""
    from ep_fsdp.router import softmax

    torch.manual_seed(12)
    logits0, grad = torch.randn(300, 8) * 4, torch.randn(300, 8)

    def run(fn) -> list[torch.Tensor]:
        logits = logits0.clone().requires_grad_()
        probs = fn(logits)
        probs.backward(grad)
        return [probs.detach(), logits.grad]

    fused = run(softmax)
    assert kernel_calls == {"_softmax_forward": 1, "_softmax_backward": 1}
    eps = torch.finfo(torch.float32).eps
    for got, want in zip(fused, run(lambda t: torch.softmax(t, dim=-1))):
        # the gradient subtracts each row's sum of grad * probs (up to max |grad| in size): a few
        # roundings of that, whatever the element's own size
        torch.testing.assert_close(got, want, rtol=4 * eps, atol=8 * eps * float(grad.abs().max()))
    monkeypatch.setattr(_fused, "FUSED_MIN_SOFTMAX_ELEMENTS", 300 * 8 + 1)
    probs = softmax(logits0.clone().requires_grad_())
    assert probs.grad_fn.name() == "SoftmaxBackward0" and kernel_calls["_softmax_forward"] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_layer_with_fused_kernels_equals_the_eager_layer(kernel_calls, monkeypatch, dtype):
    """A whole layer forward+backward runs every fused kernel and matches the eager layer (the
    switch set to 0) to the dtype's rounding, output and every gradient."""
    torch.manual_seed(7)
    layer = MoE(MoEConfig(dim=32, hidden_dim=48, num_experts=4, top_k=2)).to(dtype)
    x0 = torch.randn(2, 40, 32, dtype=dtype)
    grad = torch.randn_like(x0)

    fused = _layer_step(layer, x0, grad)
    assert set(kernel_calls) == {"_swiglu_forward", "_swiglu_backward", "_segment_sum", "_segment_sum_backward",
                                 "_softmax_forward", "_softmax_backward"}
    monkeypatch.setenv(_fused.ENV_SWITCH, "0")
    calls = sum(kernel_calls.values())
    eager = _layer_step(layer, x0, grad)
    assert sum(kernel_calls.values()) == calls
    eps = torch.finfo(dtype).eps
    for got, want in zip(fused, eager):
        torch.testing.assert_close(got, want, rtol=8 * eps, atol=8 * eps * float(want.float().abs().max()))


def test_a_failed_compile_warns_once_and_the_eager_ops_run(kernel_calls, monkeypatch):
    """Without a working compiler the first kernel call fails: one warning, the eager ops give
    the layer's results unchanged, and no kernel is tried again in this process."""
    def no_compiler(*args):
        raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

    for kernel in [k for k in vars(_fused).values() if isinstance(k, _fused._Kernel)]:
        monkeypatch.setattr(kernel, "_compiled_for", lambda args: no_compiler)
    torch.manual_seed(9)
    layer = MoE(MoEConfig(dim=16, hidden_dim=32, num_experts=4, top_k=2))
    x, grad = torch.randn(30, 16), torch.randn(30, 16)

    with pytest.warns(RuntimeWarning, match="could not build the fused CPU kernels") as caught:
        first = _layer_step(layer, x, grad)
    assert len([w for w in caught if "fused CPU kernels" in str(w.message)]) == 1
    assert "InvalidCxxCompiler" in _fused._disabled
    assert sum(kernel_calls.values()) == 1 and not _fused.fused_available(x, 10**9)
    monkeypatch.setenv(_fused.ENV_SWITCH, "0")
    for got, want in zip(first, _layer_step(layer, x, grad)):
        assert torch.equal(got, want)


def test_a_bad_input_raises_its_own_error_and_keeps_the_kernels(kernel_calls):
    """An error the eager ops raise too is the caller's: it propagates unchanged and the
    kernels stay on."""
    with pytest.raises(RuntimeError, match="size of tensor a"):
        _fused.swiglu_forward(torch.randn(8, 6), torch.randn(8, 5))
    assert _fused._disabled is None and _fused.fused_available(torch.randn(1), 10**9)


def test_each_specialization_compiles_on_its_own(kernel_calls):
    """Every dtype (and ``k``, flag) of a kernel compiles its own copy of the function, so the
    variants of one process never run into dynamo's recompile limit (which would switch the
    kernels off): here with a limit of one compiled graph per code object."""
    import torch._dynamo

    kernel = _fused._Kernel(_fused._swiglu_forward)  # a fresh one: no graphs of other tests' shapes
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        gate, up = torch.randn(64, 8, dtype=dtype), torch.randn(64, 8, dtype=dtype)
        with torch._dynamo.config.patch(recompile_limit=1):
            got = kernel(gate, up)
        assert got is not None and _fused._disabled is None, dtype
        torch.testing.assert_close(got, F.silu(gate.float()).mul(up.float()).to(dtype), **_tolerance(dtype, got.float()))
    assert torch._dynamo.config.recompile_limit == 8
    threads = torch.get_num_threads()
    try:  # one thread and several are two specializations (a serial kernel has no OpenMP loop)
        torch.set_num_threads(1)
        kernel(gate, up)
        torch.set_num_threads(2)
        kernel(gate, up)
    finally:
        torch.set_num_threads(threads)
    assert len(kernel.compiled) == 4 and {key[-1] for key in kernel.compiled} == {False, True}
