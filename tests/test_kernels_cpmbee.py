"""The linear layers of a decoding step: every route computes the layer, the measured one is taken eagerly, in a
graph that runs eagerly and in an inductor graph."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._inductor import config as inductor_config
from torch._inductor.utils import run_and_get_code

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


def _graph_linears(graph: torch.fx.GraphModule) -> tuple[list[int], int]:
    """The routes (`num_blocks`) of the `viscpm::decoding_linear` calls in a dynamo graph, and its `F.linear` calls."""
    calls = [node for node in graph.graph.nodes if node.op == "call_function"]
    routes = [node.args[2] for node in calls if node.target is torch.ops.viscpm.decoding_linear.default]
    return routes, sum(node.target is torch._C._nn.linear for node in calls)


def test_measured_linear_keeps_its_route_in_a_compiled_graph(monkeypatch):
    """A compiled graph takes the eager route measured for its shapes (at trace time when eager never measured it);
    a graph that runs eagerly runs it; with `VISCPM_MEASURED_LINEAR=0` the graph holds the stock linear."""
    layer = torch.nn.Linear(32, 300, bias=False)
    hidden = torch.randn(1, 32, generator=torch.Generator().manual_seed(0))
    key = (1, 300, 32, torch.float32, torch.get_num_threads())
    with torch.no_grad():
        expected = layer(hidden)
        for blocks in (0, 2):
            torch._dynamo.reset()
            monkeypatch.setitem(_MEASURED_BLOCKS, key, blocks)
            counter = CompileCounterWithBackend("aot_eager")
            out = torch.compile(lambda x: measured_linear(layer, x), backend=counter, fullgraph=True)(hidden)
            torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
            assert counter.frame_count == 1
            assert _graph_linears(counter.graphs[0]) == ([blocks], 0)
        torch._dynamo.reset()
        monkeypatch.delitem(_MEASURED_BLOCKS, key)
        torch.compile(lambda x: measured_linear(layer, x), backend="aot_eager", fullgraph=True)(hidden)
        assert key in _MEASURED_BLOCKS
        torch._dynamo.reset()
        monkeypatch.setenv("VISCPM_MEASURED_LINEAR", "0")
        counter = CompileCounterWithBackend("aot_eager")
        assert torch.equal(torch.compile(lambda x: measured_linear(layer, x), backend=counter)(hidden), expected)
        assert _graph_linears(counter.graphs[0]) == ([], 1)
    torch._dynamo.reset()


@pytest.mark.parametrize("rows", [1, 3])
def test_inductor_takes_the_measured_decoding_route(rows, monkeypatch):
    """The inductor compiles a decoding step's linear to fused row reductions exactly where they measured faster
    than the eager route (timed when first compiled), and either way computes the layer."""
    layer = torch.nn.Linear(64, 200, bias=False)
    hidden = torch.randn(rows, 64, generator=torch.Generator().manual_seed(0))
    key = (rows, 200, 64, torch.float32, torch.get_num_threads())
    monkeypatch.setitem(_MEASURED_BLOCKS, key, 0)
    monkeypatch.delitem(_MEASURED_REDUCTIONS, key, raising=False)
    codes = {}
    with torch.no_grad(), inductor_config.patch(force_disable_caches=True):
        expected = layer(hidden)
        for faster in (None, True, False):
            torch._dynamo.reset()
            if faster is not None:
                monkeypatch.setitem(_MEASURED_REDUCTIONS, key, faster)
            compiled = torch.compile(lambda x: measured_linear(layer, x), fullgraph=True)
            out, (codes[faster], *_) = run_and_get_code(compiled, hidden)
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
            if faster is None:
                measured = _MEASURED_REDUCTIONS[key]  # timed during the compile
    torch._dynamo.reset()
    assert "extern_kernels.mm" not in codes[True] and "cpp_fused" in codes[True]
    assert "extern_kernels.mm" in codes[False]
    assert ("extern_kernels.mm" in codes[None]) != measured
