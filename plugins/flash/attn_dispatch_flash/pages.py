"""One-row page tables for decode steps, in one Triton launch: which keys each row's one query sees,
as FA3 page ids over a ``[B, kv_heads, K, D]`` cache read as one-row pages.

``attn_dispatch.integrations.transformers_decode`` says what the table means and computes it with a dozen
small torch ops (``visible_keys`` then ``page_table``: the readable reference). In a host-bound decode
step each of those launches costs host time, once per mask and step, so :func:`one_query_pages` makes
the same two tensors in one launch, bound once per layout (:mod:`.rows_launch`'s launcher; the lengths
and offsets, which change every step, are not specialized on, so the binding holds across steps).

Key ``j`` of row ``b`` (absolute position ``key_offset + j``) is seen when ``j < length``, its position
is at most the query's (``query``: an int, or a 0-dim device tensor as StaticCache passes it), within the
window (position > query - window, when ``window``), and its padding entry (when ``padding``) is nonzero.
Row ``b``'s seen keys go in order to ``table[b, :counts[b]]`` as ``b * page_step + j``; the rest of the
row is zero. On CPU the kernel runs under ``TRITON_INTERPRET=1`` only (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from .rows_launch import _launcher

BLOCK = 1024
NUM_WARPS = 4
_INTS = ("pad_stride", "key_offset", "query", "window", "length", "page_step")


@triton.jit(do_not_specialize=list(_INTS))
def _one_query_pages_kernel(
    padding, query_ptr, table, counts,
    pad_stride, key_offset, query, window, length, page_step,
    HAS_PADDING: tl.constexpr, QUERY_ON_DEVICE: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One program per row: the seen keys' page ids, in order, then zeros, then the row's count."""
    row = tl.program_id(0)
    if QUERY_ON_DEVICE:
        query = tl.load(query_ptr).to(tl.int32)
    count = tl.full((), 0, tl.int32)
    for start in range(0, length, BLOCK):
        j = start + tl.arange(0, BLOCK)
        position = key_offset + j
        seen = (j < length) & (position <= query)
        if HAS_WINDOW:
            seen = seen & (position > query - window)
        if HAS_PADDING:
            seen = seen & (tl.load(padding + row * pad_stride + position, mask=j < length, other=0) != 0)
        seen = seen.to(tl.int32)
        rank = count + tl.cumsum(seen, 0) - 1
        tl.store(table + row * length + rank, row * page_step + j, mask=seen != 0)
        count += tl.sum(seen, 0)
    for start in range(0, length, BLOCK):
        j = start + tl.arange(0, BLOCK)
        tl.store(table + row * length + j, 0, mask=(j >= count) & (j < length))
    tl.store(counts + row, count)


_bound: dict[tuple, object] = {}


def one_query_pages(
    padding: torch.Tensor | None,
    *,
    batch: int,
    length: int,
    key_offset: int,
    query: int | torch.Tensor,
    window: int | None,
    page_step: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(table, counts)``: int32 ``[batch, length]`` page ids and ``[batch]`` seen-key counts (see the
    module docstring). ``padding``: ``[batch, >= key_offset + length]`` mask, nonzero where a key is real;
    ``query`` a Python int or a 0-dim integer tensor on ``device``."""
    assert padding is None or (padding.dim() == 2 and padding.shape[0] == batch and padding.stride(1) == 1)
    assert batch * page_step < 2**31, "page ids are int32"
    table = torch.empty(batch, length, dtype=torch.int32, device=device)
    counts = torch.empty(batch, dtype=torch.int32, device=device)
    on_device = isinstance(query, torch.Tensor)
    query_ptr = query if on_device else counts  # unread unless QUERY_ON_DEVICE
    pad = padding if padding is not None else counts
    args = (
        pad, query_ptr, table, counts,
        padding.stride(0) if padding is not None else 0, key_offset, 0 if on_device else query, window or 0, length, page_step,
    )  # fmt: skip
    constexprs = {"HAS_PADDING": padding is not None, "QUERY_ON_DEVICE": on_device, "HAS_WINDOW": bool(window), "BLOCK": BLOCK}
    if device.type == "cuda" and device.index is None:  # "cuda": the current device (the launch needs its index)
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda" and isinstance(_one_query_pages_kernel, JITFunction) and pad.data_ptr() % 16 == 0:
        # Bound per layout: the grid (batch), the dtypes and the branches; ints and lengths are not specialized on.
        key = (device, batch, pad.dtype, query_ptr.dtype, *constexprs.values())
        launch = _bound.get(key)
        if launch is None:
            launch = _launcher(_one_query_pages_kernel, batch, args, constexprs, NUM_WARPS, device) or False
            if len(_bound) > 64:
                _bound.clear()
            _bound[key] = launch
        if launch:
            launch(*args)
            return table, counts
    _one_query_pages_kernel[(batch,)](*args, **constexprs, num_warps=NUM_WARPS)
    return table, counts
