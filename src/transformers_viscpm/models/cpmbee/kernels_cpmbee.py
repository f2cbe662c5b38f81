"""The linear layers of a CPM-Bee decoding step on CPU, by the kernel measured fastest on the machine it runs on.

A decoding step multiplies a few rows (batch x beams) by every weight matrix: it is bound by reading the weights
from memory, and how fast a kernel streams them depends on the machine, not on the maths. MKL's GEMV for `x @ W.T`
ran 2.6x slower than a blocked `bmm` on one CPU in fp32 and 2x faster on another, and the other way round in bf16;
inside an inductor graph, one fused reduction per row (the weight read once for all rows) streamed 2-3x faster
than either on one CPU. So no route is hard-wired: each is timed once per (rows, shape, dtype, threads) in this
process, from memory, and the fastest is kept.
"""

import math
import os
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# (rows, out_features, in_features, dtype, threads) -> row blocks of the weight in the faster eager route (0:
# `F.linear`), as measured in this process.
_MEASURED_BLOCKS: dict[tuple[int, int, int, torch.dtype, int], int] = {}
# The same keys -> whether an inductor graph's fused row reductions beat that eager route, as measured here.
_MEASURED_REDUCTIONS: dict[tuple[int, int, int, torch.dtype, int], bool] = {}


def _route_key(rows: torch.Tensor, weight: torch.Tensor) -> tuple[int, int, int, torch.dtype, int]:
    """What a route is measured for: (rows, out_features, in_features, dtype, threads)."""
    return (rows.shape[0], *weight.shape, weight.dtype, torch.get_num_threads())


def _stock_kernels() -> bool:
    """`VISCPM_MEASURED_LINEAR=0` keeps `F.linear` everywhere (the same kernels on every run)."""
    return os.environ.get("VISCPM_MEASURED_LINEAR", "1") == "0"


def _blocked_linear(rows: torch.Tensor, weight: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """`F.linear(rows, weight)` as one batched matmul over `num_blocks` row blocks of `weight` (one pass over it)."""
    out_features, dim = weight.shape
    blocked = out_features - out_features % num_blocks
    products = torch.bmm(weight[:blocked].view(num_blocks, -1, dim), rows.t().expand(num_blocks, dim, rows.shape[0]))
    products = products.permute(2, 0, 1).reshape(rows.shape[0], blocked)
    if blocked == out_features:
        return products
    return torch.cat([products, F.linear(rows, weight[blocked:])], 1)


def _eager_linear(rows: torch.Tensor, weight: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """The eager route: `F.linear` (`num_blocks == 0`) or the blocked `bmm`."""
    return _blocked_linear(rows, weight, num_blocks) if num_blocks else F.linear(rows, weight)


def row_reductions(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear(rows, weight)` (`weight` may carry leading batch dims) as one fp32 multiply-sum per row.

    Eager, this would build a weight-sized product per row; the inductor fuses them into one kernel that reads each
    weight row once for all rows.
    """
    weight32 = weight.float()
    sums = [(weight32 * row).sum(-1) for row in rows.float().unbind(0)]
    return torch.stack(sums, -2).to(weight.dtype)


@lru_cache(maxsize=1)
def _last_level_cache_bytes() -> int:
    """The CPU's largest cache (Linux sysfs; 32 MiB where it cannot be read)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes, default=32 << 20)


def _timing_inputs(
    key: tuple[int, int, int, torch.dtype, int], weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rows and a stack `(copies, out, in)` of `weight` (or of a random matrix of its shape) filling twice the
    last-level cache, so that routes are timed as decoding runs them: from memory (a matrix timed alone would sit in
    the cache and favour the kernel that is fastest there). A weight already that large is used as it is."""
    rows, out_features, in_features, dtype, _ = key
    copies = min(256, max(1, -(-2 * _last_level_cache_bytes() // (out_features * in_features * dtype.itemsize))))
    if weight is not None and copies == 1:
        weights = weight.detach()[None]
    else:
        weights = torch.empty(copies, out_features, in_features, dtype=dtype)
        if weight is None:
            weights.uniform_(-1, 1)
        else:
            weights.copy_(weight.detach().expand_as(weights))
    return torch.empty(rows, in_features, dtype=dtype).uniform_(-1, 1), weights


def _fastest(passes: list[Callable[[], object]], rounds: int = 3) -> int:
    """The index of the fastest of `passes`: best of `rounds` alternating runs each, after one warm-up run."""
    best = [math.inf] * len(passes)
    for _ in range(rounds + 1):
        for index, run in enumerate(passes):
            start = time.perf_counter()
            run()
            best[index] = min(best[index], time.perf_counter() - start)
    return best.index(min(best))


def _measured_blocks(key: tuple[int, int, int, torch.dtype, int], weight: torch.Tensor | None = None) -> int:
    """The eager route of `key` (see `_MEASURED_BLOCKS`), timed the first time it is asked for."""
    if key not in _MEASURED_BLOCKS and _stock_kernels():
        _MEASURED_BLOCKS[key] = 0
    if key not in _MEASURED_BLOCKS:
        with torch.no_grad():
            hidden, weights = _timing_inputs(key, weight)
            num_blocks = max(2, key[4])
            routes = [lambda b=blocks: [_eager_linear(hidden, w, b) for w in weights] for blocks in (0, num_blocks)]
            _MEASURED_BLOCKS[key] = num_blocks if _fastest(routes) == 1 else 0
    return _MEASURED_BLOCKS[key]


def _measured_reductions(key: tuple[int, int, int, torch.dtype, int], num_blocks: int) -> bool:
    """Whether the inductor's fused row reductions beat the eager route `num_blocks` for `key` (timed once: a
    kernel compiled here over the whole stack of copies against the eager route over each copy)."""
    if key not in _MEASURED_REDUCTIONS:
        from torch._inductor import compile as inductor_compile
        from torch.fx.experimental.proxy_tensor import make_fx

        with torch.no_grad():
            hidden, weights = _timing_inputs(key)
            reductions = inductor_compile(make_fx(row_reductions)(hidden, weights), [hidden, weights])
            routes = [
                lambda: [_eager_linear(hidden, w, num_blocks) for w in weights],
                lambda: reductions(hidden, weights),
            ]
            _MEASURED_REDUCTIONS[key] = _fastest(routes) == 1
    return _MEASURED_REDUCTIONS[key]


def _decoding_linear(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A decoding step's `F.linear(rows, weight)` in a compiled graph: the eager route measured for it, chosen when it
    runs (a graph that runs eagerly, `aot_eager`, or symbolic sizes); the inductor decomposes it by shape instead."""
    return _eager_linear(rows, weight, _measured_blocks(_route_key(rows, weight), weight))


def _decoding_linear_shape(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return rows.new_empty(rows.shape[0], weight.shape[0])


try:  # defined once per process: a hub repo's copy of this module (remote code) may be imported beside the plugin
    decoding_linear = torch.ops.viscpm.decoding_linear.default
except AttributeError:
    decoding_linear = torch.library.custom_op("viscpm::decoding_linear", _decoding_linear, mutates_args=())
    decoding_linear.register_fake(_decoding_linear_shape)


def _inductor_decoding_linear(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The inductor's decomposition of `decoding_linear`: the fastest of the eager routes and the fused row
    reductions, timed on real tensors of the graph's sizes, outside the graph being traced. Symbolic sizes
    (`dynamic=True`) cannot be timed: the op stays, and picks its eager route when it runs."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

    key = _route_key(rows, weight)
    if not all(type(size) is int for size in key[:3]):
        return NotImplemented
    with unset_fake_temporarily(), disable_proxy_modes_tracing(), torch._guards.tracing(None):
        num_blocks = _measured_blocks(key)
        faster = _measured_reductions(key, num_blocks)
    return row_reductions(rows, weight) if faster else _eager_linear(rows, weight, num_blocks)


@torch._dynamo.assume_constant_result
def _routed_in_graphs() -> bool:
    """Whether compiled graphs take `decoding_linear` (not with `VISCPM_MEASURED_LINEAR=0`), run by dynamo at trace
    time. Teaches the inductor `_inductor_decoding_linear` once per process (its table of decompositions is imported
    only then, and the copy it caches is refreshed)."""
    if _stock_kernels():
        return False
    from torch._inductor import decomposition

    if torch.ops.viscpm.decoding_linear.default not in decomposition.decompositions:
        decomposition.register_decomposition(torch.ops.viscpm.decoding_linear.default)(_inductor_decoding_linear)
        decomposition.fast_random_decomps.cache_clear()
    return True


def measured_linear(module: nn.Linear, hidden_states: torch.Tensor) -> torch.Tensor:
    """`module(hidden_states)`; for a few rows on CPU (decoding steps) by the route measured fastest here.

    Eager: `F.linear` or a blocked `bmm`. In a compiled graph, `decoding_linear`, which the inductor may turn into
    fused row reductions. Autograd, autocast, other devices, hooks, quantized or wrapped layers (PEFT, tensor
    parallelism, offload) and biases use `module`, as does everything with `VISCPM_MEASURED_LINEAR=0` in the
    environment.
    """
    weight = module.weight
    rows = hidden_states.reshape(-1, hidden_states.shape[-1])
    plain = (
        hidden_states.device.type != "cpu"
        or type(module) is not nn.Linear
        or module.bias is not None
        or type(weight) is not nn.Parameter
        or weight.device.type != "cpu"
        or weight.dtype != hidden_states.dtype
        or rows.shape[0] > 16  # decoding steps (batch x beams); prefill is matrix-matrix work
        or type(weight.data) is not torch.Tensor  # a quantized tensor subclass has its own kernels
        or module._forward_hooks
        or module._forward_pre_hooks
        or hasattr(module, "_hf_hook")
        or torch.is_grad_enabled()
        or torch.is_autocast_enabled("cpu")
    )
    if plain:
        return module(hidden_states)
    if torch.compiler.is_compiling():
        if not _routed_in_graphs():
            return module(hidden_states)
        out = decoding_linear(rows, weight)
    else:
        num_blocks = _measured_blocks(_route_key(rows, weight), weight)
        if num_blocks == 0:
            return module(hidden_states)
        out = _blocked_linear(rows, weight, num_blocks)
    return out.view(*hidden_states.shape[:-1], weight.shape[0])
