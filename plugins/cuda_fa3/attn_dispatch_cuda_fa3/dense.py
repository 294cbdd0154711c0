"""Attention in plain torch over padded, masked sequences, with no host sync: the route the known-wrong
guard (:mod:`.known_wrong`) gives a layer that the installed FlashAttention build answers wrongly.

It takes what the kernel call it replaces takes (a :class:`~attn_dispatch_flash.FlashArgs` and the
layer's ``q, k, v, out_rows``): packed keys (``cu_seqlens_k``) or a paged cache (``page_table`` with
``seqused_k``), causal and window masks aligned bottom-right, softcap, GQA, zeros for a query that sees
no key, and rows of ``out_rows`` past the batch's last query left untouched, as FA3 leaves them. Only
device tensors and the host ints of ``FlashArgs`` are read, so it is CUDA-graph capturable.

It is right, not fast: scores are fp32 ``[batch, q-heads per kv head, max_seqlen_q, max_seqlen_k]``, one
kv head at a time (8 sequences of 2048 with 4 query heads per kv head: 512 MiB at a time).
"""

from __future__ import annotations

import torch
from attn_dispatch.plans import AttentionParams
from attn_dispatch.reference.attention import masked_softmax, visible
from attn_dispatch_flash import FlashArgs


def bind_dense(args: FlashArgs):
    """``call(q, k, v, out_rows)``: :func:`dense_attention` written into ``out_rows``."""
    if args.leftpad_k is not None:  # batch mode over left-padded rows: no op makes such a call yet
        raise NotImplementedError("the dense route takes packed or paged calls, not leftpad_k")

    def call(q, k, v, out_rows):
        dense_attention(q, k, v, args, out_rows)
        return out_rows

    return call


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: FlashArgs, out_rows: torch.Tensor) -> None:
    """Attention of ``q`` ``[tokens, heads, d]`` over ``k``/``v`` (packed ``[keys, kv_heads, d]`` or paged
    ``[pages, page_size, kv_heads, d]``) into ``out_rows`` ``[tokens, heads, dv]``, FlashAttention's semantics."""
    device, heads, kv_heads = q.device, q.shape[1], k.shape[-2]
    cu_q = a.cu_seqlens_q.long()
    len_q = cu_q[1:] - cu_q[:-1] if a.seqused_q is None else a.seqused_q.long()
    if a.page_table is not None:
        len_k, keys, values = a.seqused_k.long(), *_gather_pages(k, v, a.page_table, a.max_seqlen_k)
    else:
        cu_k = a.cu_seqlens_k.long()
        len_k = cu_k[1:] - cu_k[:-1] if a.seqused_k is None else a.seqused_k.long()
        keys, values = _gather_rows(k, cu_k[:-1], a.max_seqlen_k), _gather_rows(v, cu_k[:-1], a.max_seqlen_k)
    queries = _gather_rows(q, cu_q[:-1], a.max_seqlen_q).float()  # [B, Sq, H, d]
    params = AttentionParams(causal=a.causal, window_size=a.window_size)
    i = torch.arange(a.max_seqlen_q, device=device)[None, :, None]
    j = torch.arange(a.max_seqlen_k, device=device)[None, None, :]
    allowed = visible(i, j, len_q[:, None, None], len_k[:, None, None], params) & (j < len_k[:, None, None])
    # Rows past a sequence's keys are another sequence's, or cache slots never written (NaN, say): a zero
    # probability times NaN is NaN, so they are zeroed (FlashAttention never reads them).
    in_sequence = torch.arange(a.max_seqlen_k, device=device)[None, :] < len_k[:, None]
    values = torch.where(in_sequence[:, :, None, None], values, 0)
    group = heads // kv_heads
    padded = torch.empty(*queries.shape[:3], values.shape[-1], dtype=torch.float32, device=device)
    for h in range(kv_heads):  # one kv head's scores at a time bounds the memory
        qh = queries[:, :, h * group : (h + 1) * group]  # [B, Sq, g, d]
        scores = torch.einsum("bqgd,bkd->bgqk", qh, keys[:, :, h].float())
        probs = masked_softmax(scores, allowed[:, None], a.softmax_scale, a.softcap)  # the reference's rule
        padded[:, :, h * group : (h + 1) * group] = torch.einsum("bgqk,bkd->bqgd", probs, values[:, :, h].float())
    _scatter_rows(padded.to(out_rows.dtype), cu_q, len_q, out_rows)


def _gather_rows(x: torch.Tensor, starts: torch.Tensor, width: int) -> torch.Tensor:
    """``[B, width, ...]``: rows ``starts[b] + i`` of ``x`` (clamped into range; the mask hides the extra)."""
    index = (starts[:, None] + torch.arange(width, device=x.device)).clamp_(max=x.shape[0] - 1)
    return x[index]


def _gather_pages(k_cache, v_cache, page_table: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, width, kv_heads, d]``: each sequence's first ``width`` cache slots, through its page table."""
    page_size = k_cache.shape[1]
    position = torch.arange(width, device=k_cache.device)
    column = (position // page_size).clamp_(max=page_table.shape[1] - 1)
    pages = page_table.long()[:, column].clamp_(0, k_cache.shape[0] - 1)  # unused entries may hold anything
    slot = position % page_size
    return k_cache[pages, slot], v_cache[pages, slot]


def _scatter_rows(padded: torch.Tensor, cu_q: torch.Tensor, len_q: torch.Tensor, out_rows: torch.Tensor) -> None:
    """Write ``padded[b, i]`` into row ``cu_q[b] + i`` of ``out_rows`` for ``i < len_q[b]``; other rows keep
    their values. A gather per row (its sequence by ``searchsorted``), so no boolean indexing, no sync."""
    rows = torch.arange(out_rows.shape[0], device=out_rows.device)
    batch = (torch.searchsorted(cu_q, rows, right=True) - 1).clamp_(0, len_q.shape[0] - 1)
    position = rows - cu_q[batch]
    written = (position >= 0) & (position < len_q[batch])
    values = padded[batch, position.clamp(0, padded.shape[1] - 1)]
    out_rows.copy_(torch.where(written[:, None, None], values, out_rows))
