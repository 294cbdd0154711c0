"""Decode steps without a host sync: which keys each row's one query sees, worked out on the device.

A decode step (one query per row) is most of ``generate``'s time, and it is host-bound: the host build of
``transformers_build`` (the padding mask copied down, numpy, the key ranges uploaded) cost a few hundred us
per step on the H200's host, as much as attention saved. With one query per row no route has to be decided:
the keys a query sees are exactly its mask row, ``padding[b, kv] & kv <= q`` (and ``kv > q - window``), and
FlashAttention's paged read computes any such set exactly when each row's page table lists those keys in
order, one key per page. So the step's metadata needs no sync:

- ``key_counts[b]``: how many keys row ``b`` sees (FA3's ``seqused_k``);
- ``key_rows[b, :key_counts[b]]``: their indices in the layer's key tensor, in order; the rest zero.

A layer turns ``key_rows`` into page ids over its own K/V (``paged_keys``): transformers' caches are
``[B, H_kv, K, D]``, so key ``j`` of row ``b`` is the one-row page ``b * H_kv * K + j`` of the view
``[pages, 1, H_kv, D]`` with strides ``(D, D, K * D, 1)`` (the pages overlap in memory; FA3 only reads).
The window is already in the page table, so FA3 runs with none; softcap and GQA are FA3's as usual.

:func:`visible_keys` and :func:`page_table` are the readable reference: a dozen small torch ops. On CUDA,
:func:`pages` makes the same page table and counts in one bound Triton launch
(``attn_dispatch_flash.pages``), since each launch costs host time in a host-bound step.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

from .common import log

_cu_seqlens: dict[tuple, torch.Tensor] = {}


def covers(record) -> bool:
    """Whether a one-query mask record's 2D padding mask (if any) covers its keys: else nothing here can
    read it."""
    padding = record.padding
    return padding is None or (padding.dim() == 2 and padding.shape[-1] >= record.kv_offset + record.kv_length)


def pages(record, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(page_table, key_counts)`` of a covered one-query record over ``[B, kv_heads, K, D]`` caches: one
    Triton launch on CUDA (``attn_dispatch_flash.pages``), else :func:`visible_keys` and :func:`page_table`."""
    padding, device = record.padding, record.mask.device
    kernel = _pages_kernel() if device.type == "cuda" else None
    step = kv_heads * record.kv_length
    if kernel is not None and (padding is None or padding.stride(-1) == 1):
        return kernel.one_query_pages(
            padding, batch=record.batch, length=record.kv_length, key_offset=record.kv_offset,
            query=record.q_offset, window=record.window, page_step=step, device=device,
        )  # fmt: skip
    rows, counts = visible_keys(record)
    return page_table(rows, kv_heads, record.kv_length), counts


@functools.cache
def _pages_kernel() -> ModuleType | None:
    """``attn_dispatch_flash.pages``, or None where it (Triton, or attn_dispatch_flash) is missing; imported
    on first need (Triton reads ``TRITON_INTERPRET`` when the kernel is defined)."""
    try:
        from attn_dispatch_flash import pages as kernel
    except ImportError as exc:
        log.debug("attn_dispatch decode steps: fused page tables unavailable (%s); using torch ops", exc)
        return None
    return kernel


def visible_keys(record) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(key_rows, key_counts)`` of a one-query mask record (``transformers_meta.MaskRecord``), made on
    the device; None when its 2D mask does not cover the keys (nothing this module knows how to read)."""
    batch, length, offset, device = record.batch, record.kv_length, record.kv_offset, record.mask.device
    padding, query = record.padding, record.q_offset  # an int, or a StaticCache's 0-dim device tensor
    if not covers(record):
        return None
    positions = None
    if not isinstance(query, int) or query < offset + length - 1 or record.window:
        positions = torch.arange(offset, offset + length, device=device)
    visible = None if positions is None else positions <= query  # causal; also StaticCache's unwritten slots
    if record.window:
        visible &= positions > query - record.window
    if padding is not None:
        keys = padding[:, offset : offset + length].bool()
        visible = keys if visible is None else keys & visible
    visible = visible.expand(batch, length) if visible is not None else torch.ones(batch, length, dtype=torch.bool, device=device)
    counts = visible.sum(1, dtype=torch.int32)
    # each visible key's rank in its row; every other key goes to a spare last column
    slots = torch.where(visible, visible.cumsum(1) - 1, length)
    rows = torch.zeros(batch, length + 1, dtype=torch.int32, device=device)
    rows.scatter_(1, slots, torch.arange(length, dtype=torch.int32, device=device).expand(batch, length))
    return rows[:, :length], counts


def page_table(key_rows: torch.Tensor, kv_heads: int, kv_length: int) -> torch.Tensor:
    """``key_rows`` as page ids over ``paged_keys``' view of a ``[B, kv_heads, kv_length, D]`` cache."""
    batch = key_rows.shape[0]
    step = kv_heads * kv_length
    return key_rows + torch.arange(0, batch * step, step, dtype=torch.int32, device=key_rows.device).unsqueeze(1)


def cu_seqlens_q(batch: int, device: torch.device) -> torch.Tensor:
    """``[0, 1, ..., batch]``: one query per row (made once per batch size and device)."""
    key = (batch, device)
    cached = _cu_seqlens.get(key)
    if cached is None:
        if len(_cu_seqlens) > 64:
            _cu_seqlens.clear()
        cached = _cu_seqlens[key] = torch.arange(batch + 1, dtype=torch.int32, device=device)
    return cached


def paged_keys(cache: torch.Tensor) -> torch.Tensor | None:
    """A ``[B, H_kv, K, D]`` cache laid out head-major and contiguous (transformers' Dynamic and Static
    caches) as ``[pages, 1, H_kv, D]`` one-row pages; None for any other layout (the caller falls back)."""
    batch, heads, length, dim = cache.shape
    if cache.stride() != (heads * length * dim, length * dim, dim, 1):
        return None
    pages = (batch - 1) * heads * length + length  # the last page whose every head lies inside the cache
    return cache.as_strided((pages, 1, heads, dim), (dim, dim, length * dim, 1))
