"""The row movers of :mod:`.rows` bound once per shape: later launches skip Triton's per-call Python.

``kernel[grid](...)`` binds and specializes every argument, hashes a cache key and looks the compiled
kernel up on each call (about 30 us of host time per launch on the H200's host). An attention layer
that unpads repeats the same launch with the same sizes, strides and metadata tensors; only the source
and output pointers change. :func:`bind_gather` and :func:`bind_scatter` compile (``warmup``: nothing is
launched) for one such set of arguments and return a closure that calls the compiled kernel's launcher
directly with all arguments in order (the launcher itself skips the constexprs).

Contract of a bound launch: the sources passed later have the same shapes, strides, dtype and device as
those given at bind time, and the same 16-byte alignment of their data pointers (Triton specializes
pointers on it). The caller keys its cache by exactly these (varlen_diffusion's ``binding.call_key``,
``attn_dispatch.integrations.unpad.RowMovers``). Profiler launch hooks
(``knobs.runtime.launch_enter_hook``) are not called for bound launches.

Off the GPU (``TRITON_INTERPRET=1`` tests) the closures call :func:`gather_rows`/:func:`scatter_rows`
as they are: same results, no launcher to bind.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import triton
from triton.runtime.jit import JITFunction

from . import rows
from .rows import gather_rows, scatter_rows

log = logging.getLogger("attn_dispatch")


def _direct_launches(device: torch.device) -> bool:
    """True where a compiled kernel exists to launch directly (a CUDA tensor with Triton compiling)."""
    return device.type == "cuda" and isinstance(rows._gather_rows_kernel, JITFunction)


def _launcher(kernel, grid: int, args: tuple, constexprs: dict, num_warps: int, device: torch.device):
    """Compile ``kernel`` for ``args`` (no launch) and return ``launch(*args)`` on the current stream, or
    None (the caller then launches through Triton as usual) where Triton hands back no compiled kernel or
    a launcher this module does not know how to call."""
    try:
        compiled = kernel.warmup(*args, **constexprs, num_warps=num_warps, grid=(grid,))
        if not hasattr(compiled, "_init_handles"):  # a cache hook or async compilation took over
            return None
        compiled._init_handles()  # loads the module: the launcher and function handle exist from here on
        run, function, packed = compiled.run, compiled.function, compiled.packed_metadata
        from triton.runtime import driver

        get_stream = driver.active.get_current_stream
    except Exception as exc:  # noqa: BLE001  (a Triton whose internals moved: keep working, slower)
        log.warning("attn_dispatch_flash rows: cannot bind %s's launcher (%s); launching through Triton", kernel, exc)
        return None
    tail = tuple(constexprs.values())
    # The launcher takes every parameter in order, constexprs included (it skips those): check the count.
    expected = getattr(run, "arg_annotations", None)
    if expected is not None and len(expected) != len(args) + len(tail):
        message = "attn_dispatch_flash rows: %s's launcher takes %d arguments, not %d; launching through Triton"
        log.warning(message, kernel, len(expected), len(args) + len(tail))
        return None
    index = device.index

    def launch(*call_args) -> None:
        run(grid, 1, 1, get_stream(index), function, packed, None, None, None, *call_args, *tail)

    return launch


def bind_gather(like: Sequence[torch.Tensor], indices: torch.Tensor) -> Callable[..., torch.Tensor]:
    """``gather(*sources) -> [len(like), n, H, D]`` equal to ``gather_rows(sources, indices)``, for sources
    laid out as ``like`` (see the module contract). ``indices`` is fixed (the metadata's)."""
    first = like[0]
    n_src = len(like)
    _, seqlen, heads, head_dim = first.shape
    n_rows = indices.shape[0]
    shape, dtype, device = (n_src, n_rows, heads, head_dim), first.dtype, first.device
    same_strides = all(x.stride() == first.stride() for x in like)
    if not _direct_launches(device) or n_rows == 0 or not same_strides:
        return lambda *sources: gather_rows(sources, indices)
    grid = triton.cdiv(n_rows, rows.BLOCK_ROWS) * heads
    constexprs = {
        "NUM_SRC": n_src, "HEADS": heads, "HEAD_DIM": head_dim, "BLOCK_D": triton.next_power_of_2(head_dim),
        "BLOCK_ROWS": rows.BLOCK_ROWS, "HEADS_INNER": rows.HEADS_INNER,
    }  # fmt: skip
    sizes = (n_rows, n_rows * heads * head_dim, seqlen, *first.stride())
    sample = torch.empty(shape, dtype=dtype, device=device)
    padded = list(like) + [first] * (3 - n_src)
    args = (*padded, sample, indices, *sizes)
    launch = _launcher(rows._gather_rows_kernel, grid, args, constexprs, rows.NUM_WARPS, device)
    if launch is None:
        return lambda *sources: gather_rows(sources, indices)

    if n_src == 2:

        def gather(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            out = torch.empty(shape, dtype=dtype, device=device)
            launch(a, b, a, out, indices, *sizes)
            return out

        return gather

    def gather_any(*sources: torch.Tensor) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype, device=device)
        launch(*sources, *(sources[0],) * (3 - n_src), out, indices, *sizes)
        return out

    return gather_any


def bind_scatter(
    like: torch.Tensor, inverse: torch.Tensor, batch: int, seqlen: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``scatter(packed) -> [batch, seqlen, H, D]`` equal to ``scatter_rows(packed, inverse, batch, seqlen)``
    for ``packed`` laid out as ``like``."""
    _, heads, head_dim = like.shape
    n_dst_rows = batch * seqlen
    shape, dtype, device = (batch, seqlen, heads, head_dim), like.dtype, like.device
    if not _direct_launches(device) or n_dst_rows == 0:
        return lambda packed: scatter_rows(packed, inverse, batch, seqlen)
    grid = triton.cdiv(n_dst_rows, rows.BLOCK_ROWS) * heads
    constexprs = {
        "HEADS": heads, "HEAD_DIM": head_dim, "BLOCK_D": triton.next_power_of_2(head_dim),
        "BLOCK_ROWS": rows.BLOCK_ROWS, "HEADS_INNER": rows.HEADS_INNER,
    }  # fmt: skip
    strides = like.stride()
    sample = torch.empty(shape, dtype=dtype, device=device)
    args = (like, sample, inverse, n_dst_rows, *strides)
    launch = _launcher(rows._scatter_rows_kernel, grid, args, constexprs, rows.NUM_WARPS, device)
    if launch is None:
        return lambda packed: scatter_rows(packed, inverse, batch, seqlen)

    def scatter(packed: torch.Tensor) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype, device=device)
        launch(packed, out, inverse, n_dst_rows, *strides)
        return out

    return scatter


def index_select_gather(like: Sequence[torch.Tensor], indices: torch.Tensor) -> Callable[..., torch.Tensor] | None:
    """The same gather as two-or-three ``torch.index_select`` calls on ``[B * S, H * D]`` row views into
    one output (benchmarks compare its host and GPU time with the Triton kernel's); None when a source's
    rows cannot be viewed that way."""
    first = like[0]
    batch, seqlen, heads, head_dim = first.shape
    for x in like:
        if x.stride(3) != 1 or x.stride(2) != head_dim or x.stride(0) != seqlen * x.stride(1):
            return None
    n_src, n_rows = len(like), indices.shape[0]
    shape, dtype, device = (n_src, n_rows, heads, head_dim), first.dtype, first.device
    long_indices = indices.long()
    row_shape = (batch * seqlen, heads * head_dim)

    def gather(*sources: torch.Tensor) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype, device=device)
        flat = out.view(n_src, n_rows, heads * head_dim)
        for t, src in enumerate(sources):
            torch.index_select(src.as_strided(row_shape, (src.stride(1), 1)), 0, long_indices, out=flat[t])
        return out

    return gather
