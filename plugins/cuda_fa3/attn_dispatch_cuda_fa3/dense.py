"""Attention in plain torch over padded, masked sequences, with no host sync: the route the known-wrong
guard (:mod:`.known_wrong`) gives a layer that the installed FlashAttention build answers wrongly.

It takes what the kernel call it replaces takes (a :class:`~attn_dispatch_flash.FlashArgs` and the
layer's ``q, k, v, out``), with FA3's semantics: causal and window masks aligned bottom-right, softcap,
GQA, zeros for a query that sees no key. Two kinds of call:

* packed keys (``cu_seqlens_k``) or a paged cache (``page_table`` with ``seqused_k``), ``q`` and ``out``
  ``[tokens, heads, d]``: rows of ``out`` past the batch's last query are left untouched, as FA3 leaves them;
* batch mode (``leftpad_k``): ``q``/``out`` ``[B, S_q, heads, d]``, ``k``/``v`` ``[B, S_k, kv_heads, d]``
  read in place; row ``b``'s keys are ``k[b, leftpad_k[b]:seqused_k[b]]`` and all ``S_q`` of its queries
  attend to them; every row of ``out`` is written.

Keys outside a sequence (another sequence's, or cache slots never written: NaN, say) never reach the
answer. Only device tensors and the host ints of ``FlashArgs`` are read, so it is CUDA-graph capturable.

It is right, not fast: scores are fp32 ``[batch, q-heads per kv head, max_seqlen_q, max_seqlen_k]`` (batch
mode: ``S_q, S_k``), one kv head at a time (8 sequences of 2048 with 4 query heads per kv head: 512 MiB at
a time).
"""

from __future__ import annotations

import torch
from attn_dispatch.plans import AttentionParams
from attn_dispatch.reference.attention import masked_softmax, visible
from attn_dispatch_flash import FlashArgs


def bind_dense(args: FlashArgs):
    """``call(q, k, v, out)``: :func:`dense_attention` written into ``out``."""
    if args.leftpad_k is not None and (
        args.page_table is not None or args.cu_seqlens_q is not None or args.cu_seqlens_k is not None or args.seqused_k is None
    ):  # fmt: skip
        raise NotImplementedError("the dense route's batch mode (leftpad_k) takes seqused_k, no page table or cu_seqlens")

    def call(q, k, v, out):
        dense_attention(q, k, v, args, out)
        return out

    return call


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: FlashArgs, out: torch.Tensor) -> None:
    """Attention of ``q`` over ``k``/``v`` into ``out``, FlashAttention's semantics: ``q`` ``[tokens, heads, d]``
    over packed ``[keys, kv_heads, d]`` or paged ``[pages, page_size, kv_heads, d]`` keys into ``out``
    ``[tokens, heads, dv]``; or, with ``leftpad_k``, ``[B, S, heads, d]`` tensors (batch mode)."""
    params = AttentionParams(causal=a.causal, window_size=a.window_size)
    if a.leftpad_k is not None:  # batch mode: k/v read in place, key j of row b is its (j - start)-th
        j = torch.arange(k.shape[1], device=q.device)[None, :]
        start, end = a.leftpad_k.long()[:, None], a.seqused_k.long()[:, None]  # [B, 1]
        in_sequence = (j >= start) & (j < end)  # [B, S_k]
        i = torch.arange(q.shape[1], device=q.device)[None, :, None]
        allowed = visible(i, (j - start)[:, None, :], q.shape[1], (end - start)[:, :, None], params)
        out.copy_(_attend(q, k, v, allowed & in_sequence[:, None, :], in_sequence, a))
        return
    cu_q = a.cu_seqlens_q.long()
    len_q = cu_q[1:] - cu_q[:-1] if a.seqused_q is None else a.seqused_q.long()
    if a.page_table is not None:
        len_k, keys, values = a.seqused_k.long(), *_gather_pages(k, v, a.page_table, a.max_seqlen_k)
    else:
        cu_k = a.cu_seqlens_k.long()
        len_k = cu_k[1:] - cu_k[:-1] if a.seqused_k is None else a.seqused_k.long()
        keys, values = _gather_rows(k, cu_k[:-1], a.max_seqlen_k), _gather_rows(v, cu_k[:-1], a.max_seqlen_k)
    queries = _gather_rows(q, cu_q[:-1], a.max_seqlen_q)  # [B, Sq, H, d]
    i = torch.arange(a.max_seqlen_q, device=q.device)[None, :, None]
    j = torch.arange(a.max_seqlen_k, device=q.device)[None, None, :]
    in_sequence = j[0] < len_k[:, None]  # [B, Sk]
    allowed = visible(i, j, len_q[:, None, None], len_k[:, None, None], params) & in_sequence[:, None, :]
    padded = _attend(queries, keys, values, allowed, in_sequence, a)
    _scatter_rows(padded.to(out.dtype), cu_q, len_q, out)


def _attend(queries, keys, values, allowed: torch.Tensor, in_sequence: torch.Tensor, a: FlashArgs) -> torch.Tensor:
    """fp32 ``[B, Sq, H, dv]``: ``queries`` ``[B, Sq, H, d]`` over ``keys``/``values`` ``[B, Sk, kv_heads, d]``
    where ``allowed`` ``[B, Sq, Sk]``. Values outside a sequence (``in_sequence`` ``[B, Sk]`` False) are
    zeroed: a zero probability times NaN is NaN (FlashAttention never reads them)."""
    heads, kv_heads = queries.shape[2], keys.shape[2]
    group = heads // kv_heads
    result = torch.empty(*queries.shape[:3], values.shape[-1], dtype=torch.float32, device=queries.device)
    for h in range(kv_heads):  # one kv head's scores at a time bounds the memory
        qh = queries[:, :, h * group : (h + 1) * group].float()  # [B, Sq, g, d]
        scores = torch.einsum("bqgd,bkd->bgqk", qh, keys[:, :, h].float())
        probs = masked_softmax(scores, allowed[:, None], a.softmax_scale, a.softcap)  # the reference's rule
        vh = torch.where(in_sequence[:, :, None], values[:, :, h].float(), 0)
        result[:, :, h * group : (h + 1) * group] = torch.einsum("bgqk,bkd->bqgd", probs, vh)
    return result


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
