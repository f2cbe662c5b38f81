"""The linear layers of a decoding step: every route computes the layer, the measured one is taken eagerly, in a
graph that runs eagerly and in an inductor graph."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._inductor import config as inductor_config
from torch._inductor.utils import run_and_get_code

from transformers_viscpm.models.cpmbee import kernels_cpmbee
from transformers_viscpm.models.cpmbee.kernels_cpmbee import (
    _MEASURED_BLOCKS,
    _MEASURED_REDUCTIONS,
    measured_linear,
    row_reductions,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (2, 3), (4, 4)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_measured_linear_is_the_linear_layer_by_either_route(shape, threads, dtype, monkeypatch):
    """The measured choice is recorded once per (rows, shape, dtype, threads); both routes compute `module(x)`."""
    lm_head = torch.nn.Linear(48, 1001, bias=False).to(dtype)  # a vocabulary the blocks do not divide
    hidden = torch.randn(*shape, 48, generator=torch.Generator().manual_seed(0)).to(dtype)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    key = (shape[0] * shape[1], 1001, 48, dtype, threads)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    with torch.no_grad():
        expected = lm_head(hidden)
        _MEASURED_BLOCKS.pop(key, None)
        measured_linear(lm_head, hidden)
        assert _MEASURED_BLOCKS[key] in (0, max(2, threads))
        for blocks in (0, 2, 3, 4):
            monkeypatch.setitem(_MEASURED_BLOCKS, key, blocks)
            torch.testing.assert_close(measured_linear(lm_head, hidden), expected, atol=tolerance, rtol=tolerance)
    # With autograd on (training), more rows than a decoding step has (a prefill), or a layer with a bias, only the
    # linear layer runs.
    assert torch.equal(measured_linear(lm_head, hidden), lm_head(hidden))
    prefill = torch.randn(17, 48, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(measured_linear(lm_head, prefill), lm_head(prefill))
    assert (17, 1001, 48, dtype, threads) not in _MEASURED_BLOCKS
    # VISCPM_MEASURED_LINEAR=0 keeps the stock kernel without timing anything.
    monkeypatch.setenv("VISCPM_MEASURED_LINEAR", "0")
    monkeypatch.delitem(_MEASURED_BLOCKS, key)
    with torch.no_grad():
        assert torch.equal(measured_linear(lm_head, hidden), expected)
    assert _MEASURED_BLOCKS.pop(key) == 0
    biased = torch.nn.Linear(48, 8).to(dtype)
    monkeypatch.setitem(_MEASURED_BLOCKS, (*key[:1], 8, 48, dtype, threads), 2)
    with torch.no_grad():
        assert torch.equal(measured_linear(biased, hidden), biased(hidden))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_reductions_are_the_linear_map(dtype):
    """The reductions the inductor fuses compute `F.linear`, for one weight and for a stack of them (as timed)."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(3, 40, generator=generator).to(dtype)
    weights = torch.randn(2, 70, 40, generator=generator).to(dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    for weight in weights:
        torch.testing.assert_close(row_reductions(rows, weight), rows @ weight.T, atol=tolerance, rtol=tolerance)
    stacked = row_reductions(rows, weights)
    assert stacked.shape == (2, 3, 70) and stacked.dtype == dtype
    torch.testing.assert_close(stacked, rows @ weights.transpose(1, 2), atol=tolerance, rtol=tolerance)


def _graph_linears(graph: torch.fx.GraphModule) -> tuple[int, int]:
    """The `viscpm::decoding_linear` calls of a dynamo graph, and its `F.linear` calls."""
    calls = [node.target for node in graph.graph.nodes if node.op == "call_function"]
    return calls.count(torch.ops.viscpm.decoding_linear.default), calls.count(torch._C._nn.linear)


def test_a_graph_run_eagerly_takes_the_measured_route(monkeypatch):
    """In a compiled graph a decoding step's linear is `viscpm::decoding_linear`; a graph that runs eagerly
    (`aot_eager`, or symbolic sizes) takes the eager route measured for its sizes when it runs (timed then if never
    before). With `VISCPM_MEASURED_LINEAR=0` the graph holds the stock linear."""
    layer = torch.nn.Linear(32, 300, bias=False)
    key = (1, 300, 32, torch.float32, torch.get_num_threads())
    calls = []
    original = kernels_cpmbee._eager_linear
    monkeypatch.setattr(kernels_cpmbee, "_eager_linear", lambda *args: calls.append(args[2]) or original(*args))
    with torch.no_grad():
        hidden = torch.randn(1, 32, generator=torch.Generator().manual_seed(0))
        expected = layer(hidden)
        for blocks in (0, 2, None):
            torch._dynamo.reset()
            if blocks is None:
                monkeypatch.delitem(_MEASURED_BLOCKS, key)
            else:
                monkeypatch.setitem(_MEASURED_BLOCKS, key, blocks)
            counter = CompileCounterWithBackend("aot_eager")
            out = torch.compile(lambda x: measured_linear(layer, x), backend=counter, fullgraph=True)(hidden)
            torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
            assert counter.frame_count == 1 and _graph_linears(counter.graphs[0]) == (1, 0)
            assert calls.pop() == (_MEASURED_BLOCKS[key] if blocks is None else blocks)
        torch._dynamo.reset()
        compiled = torch.compile(
            lambda x: measured_linear(layer, x), backend="aot_eager", dynamic=True, fullgraph=True
        )
        for rows in (2, 3, 5):
            batch = torch.randn(rows, 32)
            torch.testing.assert_close(compiled(batch), layer(batch), atol=1e-6, rtol=1e-6)
            assert (rows, *key[1:]) in _MEASURED_BLOCKS
        torch._dynamo.reset()
        monkeypatch.setenv("VISCPM_MEASURED_LINEAR", "0")
        counter = CompileCounterWithBackend("aot_eager")
        assert torch.equal(torch.compile(lambda x: measured_linear(layer, x), backend=counter)(hidden), expected)
        assert _graph_linears(counter.graphs[0]) == (0, 1)
    torch._dynamo.reset()


@pytest.mark.parametrize("rows", [1, 3])
def test_inductor_takes_the_measured_decoding_route(rows, monkeypatch):
    """The inductor compiles a decoding step's linear to the route measured fastest for its sizes (timed when first
    compiled): fused row reductions, `F.linear` or the blocked `bmm`; each computes the layer."""
    layer = torch.nn.Linear(64, 200, bias=False)
    hidden = torch.randn(rows, 64, generator=torch.Generator().manual_seed(0))
    key = (rows, 200, 64, torch.float32, torch.get_num_threads())
    monkeypatch.delitem(_MEASURED_BLOCKS, key, raising=False)
    monkeypatch.delitem(_MEASURED_REDUCTIONS, key, raising=False)
    codes = {}
    with torch.no_grad(), inductor_config.patch(force_disable_caches=True):
        expected = layer(hidden)
        for route in ("measured", "reductions", "linear", "blocked"):
            torch._dynamo.reset()
            if route != "measured":
                monkeypatch.setitem(_MEASURED_BLOCKS, key, 2 if route == "blocked" else 0)
                monkeypatch.setitem(_MEASURED_REDUCTIONS, key, route == "reductions")
            compiled = torch.compile(lambda x: measured_linear(layer, x), fullgraph=True)
            out, (codes[route], *_) = run_and_get_code(compiled, hidden)
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
            if route == "measured":  # timed during the compile
                measured = (
                    "reductions" if _MEASURED_REDUCTIONS[key] else "blocked" if _MEASURED_BLOCKS[key] else "linear"
                )
    torch._dynamo.reset()
    kernels = {route: ("extern_kernels.mm" in code, "extern_kernels.bmm" in code) for route, code in codes.items()}
    assert kernels["reductions"] == (False, False) and "cpp_fused" in codes["reductions"]
    assert kernels["linear"] == (True, False)
    assert kernels["blocked"] == (False, rows > 1)  # the inductor rewrites a bmm by one column as a reduction itself
    assert kernels["measured"] == kernels[measured]
