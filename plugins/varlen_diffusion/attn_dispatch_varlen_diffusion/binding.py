"""One masked-attention call laid out once per (metadata, call shape): the per-block path runs a closure.

Everything shape-derived is decided here, once: the route (zero-copy, K/V pack, Q/K/V pack), the
FlashAttention arguments (``FlashProvider.bind``: vllm's raw op gets its positional arguments laid
out once), the bound pack/scatter launches (:mod:`attn_dispatch_flash.rows_launch`), the query offsets
``b * S_q`` for cross-attention, and how q/k/v become token rows. The closure then only launches and
returns (where every output row is written, the FlashAttention op allocates its output itself: one
Python-level allocation fewer per call): no host sync, nothing that a CUDA graph cannot capture.

:func:`call_key` is what a bound call may be reused for: the ops object, q/k/v shapes, strides, dtypes,
devices, the 16-byte alignment of their data pointers (Triton specializes on it) and the scale as
given. The cache lives on the metadata (``VarlenMaskMeta.calls``), so it can never serve another mask.

Routes (``S_q == S_k`` is self-attention, where masked query rows exist; for cross-attention every
query row is valid, so nothing is zeroed and Q is never packed):

- no valid key in the batch: zeros, no launch;
- ``pack_queries`` (self): gather Q/K/V rows, attention on packed tokens, scatter back with zeros;
- packed strategies otherwise: gather K/V rows (``kv_pack``: all ``B * S_k``, valid ones first, so the
  launch depends on shapes only); Q and the output stay padded (``cu_seqlens_q = b*S_q``); masked query
  rows zeroed in place under ``qkv_pack`` with Q in place (self);
- ``zero_copy``: K/V read in place (``cu_seqlens_k = b*S_k + run start``, ``seqused_k``); under the
  zeroing contract (self) Q too, through ``seqused_q`` into a zeroed output.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from attn_dispatch_flash.rows import scatter_rows
from attn_dispatch_flash.rows_launch import bind_gather, bind_scatter

from .meta import Strategy, VarlenMaskMeta

BoundCall = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def call_key(ops: object, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None) -> tuple:
    """Everything a bound call depends on besides the metadata (see the module docstring).

    Built on every call, so it is kept to cheap reads: devices as ``get_device()`` ints (CUDA index; -1
    off CUDA, where the stand-in's CPU tensors are the only fast-path inputs) and the pointers' offsets
    from 16-byte alignment packed into one int.
    """
    return (
        ops, q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype, k.dtype, v.dtype,
        q.get_device(), k.get_device(), v.get_device(),
        (q.data_ptr() & 15) | (k.data_ptr() & 15) << 4 | (v.data_ptr() & 15) << 8, softmax_scale,
    )  # fmt: skip


def _rows_of(x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``[B, S, H, D] -> [B * S, H, D]`` for tensors strided like ``x``: a view when the strides allow
    (FlashAttention takes any row and head strides with a unit-stride last dim), else a contiguous copy.

    One batch row is always a view: ``x[0]``, whatever its row and head strides, such as the ``[B, S, H, D]``
    transpose of a ``[B, H, S, D]`` tensor that processors computing in heads-first layout hand over."""
    shape = (x.shape[0] * x.shape[1], x.shape[2], x.shape[3])
    if x.stride(3) == 1 and x.stride(0) == x.shape[1] * x.stride(1):
        return lambda t: t.view(shape)
    if x.stride(3) == 1 and x.shape[0] == 1:
        return lambda t: t[0]
    return lambda t: t.reshape(shape).contiguous()


def bind_call(
    provider, meta: VarlenMaskMeta, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
    key_pages: bool = False,
) -> BoundCall:
    """``call(q, k, v) -> [B, S_q, H, D_v]`` for tensors matching these in :func:`call_key`.

    ``key_pages``: packed strategies read K/V in place as one-row pages (``meta.page_table``) instead of
    gathering them (one launch fewer per call; same keys in the same order).

    Preconditions (checked by the caller): q ``[B, S_q, H, D]``, k/v ``[B, S_k, H_kv, D]`` (``H_kv``
    divides ``H``), the key mask ``[B, S_k]`` on q's device, a dtype and head dim FlashAttention takes.
    """
    batch, seqlen_q, heads, _ = q.shape
    seqlen_k, head_dim_v = k.shape[1], v.shape[3]
    dtype, device = q.dtype, q.device
    out_shape = (batch, seqlen_q, heads, head_dim_v)
    if meta.total == 0:  # no valid key anywhere: FlashAttention would write zeros; skip the launch (a total
        # not known on the host, None, launches: FlashAttention writes those zeros itself)
        return lambda q, k, v: q.new_zeros(out_shape)
    self_attention = seqlen_q == seqlen_k
    rows_q, rows_k, rows_v = _rows_of(q), _rows_of(k), _rows_of(v)
    writes_out = provider.writes_out

    # No FA3 scheduler metadata here, though cuda_fa3's plans make it once per batch: for these varlen
    # calls (non-causal, no page table) handing it in cost 2-3 us more host time per call on the H200 and
    # saved no GPU time (benchmarks/diag_fa3_metadata.py); only paged calls gain (8 us host, 7 us GPU).
    def flash(cu_q, cu_k, max_q, *, seqused_q=None, seqused_k=None):
        return provider.bind(
            cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, seqused_q=seqused_q, seqused_k=seqused_k, max_seqlen_q=max_q,
            max_seqlen_k=seqlen_k, softmax_scale=scale, causal=False,
        )  # fmt: skip

    def empty(n: int) -> Callable[[], torch.Tensor | None]:
        shape = (n, heads, head_dim_v)
        return (lambda: torch.empty(shape, dtype=dtype, device=device)) if writes_out else (lambda: None)

    if self_attention and meta.pack_queries:
        return _bind_packed_queries(meta, q, k, v, flash, empty)

    if self_attention:
        cu_q_padded = meta.cu_seqlens_padded
    else:  # b * S_q: made once here, then owned by the metadata's cache
        cu_q_padded = torch.arange(batch + 1, dtype=torch.int32, device=device) * seqlen_q

    if meta.strategy is not Strategy.ZERO_COPY:  # kv_pack, or qkv_pack with Q in place
        masked = meta.masked if self_attention and meta.masked is not None and meta.masked.numel() else None
        if key_pages and meta.page_table is not None and _viewable(k) and _viewable(v):
            return _bind_key_pages(provider, meta, rows_q, cu_q_padded, seqlen_q, seqlen_k, scale, masked, out_shape)
        gather_kv = bind_gather((k, v), meta.indices)
        run = flash(cu_q_padded, meta.cu_seqlens_k, seqlen_q)

        def kv_pack(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            k_p, v_p = gather_kv(k, v).unbind(0)  # one op for both views
            out = run(rows_q(q), k_p, v_p, None)  # every output row is written: let the kernel allocate
            if masked is not None:
                out.index_fill_(0, masked, 0)
            return out.reshape(out_shape)

        return kv_pack

    if self_attention and meta.zero_masked_queries:  # masked query rows skipped into a zeroed output
        run = flash(meta.cu_seqlens_k, meta.cu_seqlens_k, seqlen_q, seqused_q=meta.seqlens, seqused_k=meta.seqlens)
        zeros_shape = (batch * seqlen_q, heads, head_dim_v)

        def zero_copy_zeroing(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(zeros_shape, dtype=dtype, device=device)
            return run(rows_q(q), rows_k(k), rows_v(v), out).reshape(out_shape)

        return zero_copy_zeroing

    run = flash(cu_q_padded, meta.cu_seqlens_k, seqlen_q, seqused_k=meta.seqlens)

    def zero_copy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return run(rows_q(q), rows_k(k), rows_v(v), None).reshape(out_shape)

    return zero_copy


def _viewable(x: torch.Tensor) -> bool:
    return x.stride(3) == 1 and x.stride(0) == x.shape[1] * x.stride(1)


def _bind_key_pages(provider, meta, rows_q, cu_q, seqlen_q, seqlen_k, scale, masked, out_shape) -> BoundCall:
    """K/V read in place through ``meta.page_table`` (pages of one row: ``[B * S_k, 1, H_kv, D]`` views)."""
    run = provider.bind(
        cu_seqlens_q=cu_q, seqused_k=meta.seqlens, page_table=meta.page_table, max_seqlen_q=seqlen_q,
        max_seqlen_k=seqlen_k, softmax_scale=scale, causal=False,
    )  # fmt: skip

    def key_pages(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        pages = (k.shape[0] * k.shape[1], 1, k.shape[2], k.shape[3])
        out = run(rows_q(q), k.view(pages), v.view(pages), None)
        if masked is not None:
            out.index_fill_(0, masked, 0)
        return out.reshape(out_shape)

    return key_pages


def _bind_packed_queries(meta, q, k, v, flash, empty) -> BoundCall:
    """Self-attention with masked query rows dropped: gather, attend on packed tokens, scatter with zeros."""
    batch, seqlen = meta.batch, meta.seqlen
    if q.shape == k.shape:  # one launch for all three
        gather_qkv = bind_gather((q, k, v), meta.indices)

        def gather(q, k, v):
            return gather_qkv(q, k, v).unbind(0)

    else:  # GQA: Q has more heads than K/V
        gather_q, gather_kv = bind_gather((q,), meta.indices), bind_gather((k, v), meta.indices)

        def gather(q, k, v):
            return (gather_q(q)[0], *gather_kv(k, v).unbind(0))

    run = flash(meta.cu_seqlens_k, meta.cu_seqlens_k, seqlen)
    new_out = empty(meta.total)
    sample = new_out()
    if sample is not None:
        scatter = bind_scatter(sample, meta.inverse, batch, seqlen)
    else:  # the provider allocates its output: its strides are its own
        def scatter(packed):
            return scatter_rows(packed, meta.inverse, batch, seqlen)

    def packed_queries(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q_p, k_p, v_p = gather(q, k, v)
        return scatter(run(q_p, k_p, v_p, new_out()))

    return packed_queries
