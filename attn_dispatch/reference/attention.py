"""Original path for attention into the engine's output buffer (seed PRs sglang #21985, #21104).

The pre-optimization code allocated the attention result, then copied it into the engine's ``out``, and
left FA3's scheduling to the kernel at every layer. This module is that contract in portable torch: the
plan carries no metadata, the result is computed into a fresh tensor and copied into ``out`` once.

Semantics every implementation matches (FA3's):
- sequence ``b`` owns query tokens ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` (``Lq`` of them) and attends to
  its first ``Lk`` keys (a padded plan: all ``max_seqlen_q`` queries of row ``b`` and its keys
  ``key_starts[b]:cache_seqlens[b]``, read in place);
- causal masking and windows are aligned bottom-right: query ``i`` sees key ``j`` iff
  ``j <= i + Lk - Lq`` (causal), ``j >= i + Lk - Lq - left`` and ``j <= i + Lk - Lq + right`` (window);
- ``softcap > 0`` maps scores to ``softcap * tanh(score / softcap)``;
- a query with no visible key gets zeros;
- ``q`` rows past ``cu_seqlens_q[-1]`` (CUDA-graph padding) give unspecified ``out`` rows (zeros here);
  ``out`` rows past ``q``'s rows are never written.

Arguments are checked by the op's one rule set (``attn_dispatch.validate``), which the plugins call too, so
bad input raises the same ``ValueError`` here as on the GPU, before ``out`` is written.

It is a reference, not a fast path: it materialises ``[tokens, keys, heads]`` scores. It never syncs
with the device (segment ids come from ``searchsorted``, not ``.tolist()``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..plans import DEFAULT_PARAMS, AttentionParams, AttentionPlan
from ..validate import (
    check_packed_layer,
    validate_bind_attention,
    validate_make_attention_plan,
    validate_padded_run,
    validate_paged_attention_out,
    validate_varlen_attention_out,
)


def make_attention_plan(
    *,
    cache_seqlens: torch.Tensor | None = None,
    page_table: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    key_starts: torch.Tensor | None = None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    page_size: int | None = None,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    head_dim_v: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    layer_params: Sequence[AttentionParams] = (DEFAULT_PARAMS,),
    static_plan: AttentionPlan | None = None,
) -> AttentionPlan:
    """Describe one forward batch. Call once per step; pass the result to every layer.

    Paged (``paged_attention_out``, or ``bind_attention``'s run): ``cache_seqlens``, ``page_table``,
    ``page_size`` and ``cu_seqlens_q``. Packed (``bind_attention``'s run over ``[tokens, heads, d]`` q/k/v,
    as ``varlen_attention_out`` takes them): ``cu_seqlens_q`` and ``cu_seqlens_k``. Padded
    (``bind_attention``'s run over a padded batch's ``[B, S, heads, d]`` q/k/v/out, read in place, no pack
    and no scatter): ``cache_seqlens`` as each row's key end and ``key_starts`` as its first key, with
    ``max_seqlen_q``/``max_seqlen_k`` the batch's query and key lengths ``S_q``/``S_k``. Padded plans are
    optional: an implementation that cannot read padded rows in place (cuda_fa3 over FA4) refuses them with
    a ValueError naming ``key_starts``, and the caller makes a packed plan instead.

    ``layer_params`` lists the distinct :class:`AttentionParams` the model's layers use (a model mixing
    sliding-window and global layers lists both); a layer may only use params listed here.

    ``static_plan`` (paged plans, CUDA graphs with the plan made outside the graph): a plan made earlier, whose
    persistent metadata buffers receive this batch's metadata (fresh metadata in the front, zeros in the
    tail) instead of new allocations. This batch's tensors must be ``static_plan``'s own tensors or views
    at their front (the engine's static graph inputs). Same batch size: ``static_plan`` is refreshed in
    place and returned (before each replay). Smaller batch: a new plan sharing its buffers is returned
    (to capture a smaller graph against the buffers sized for the largest one). A plan made inside the
    capture needs no ``static_plan``: its metadata is recomputed by every replay.
    The original path has nothing to precompute: it returns a plain :class:`AttentionPlan` (a plugin's plan
    subclass, such as cuda_fa3's ``FlashPlan``, carries its kernels' metadata).
    """
    checked = validate_make_attention_plan(
        cache_seqlens=cache_seqlens, page_table=page_table, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        key_starts=key_starts, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, page_size=page_size, num_heads=num_heads,
        num_kv_heads=num_kv_heads, head_dim=head_dim, head_dim_v=head_dim_v, dtype=dtype, layer_params=layer_params,
        static_plan=static_plan,
    )  # fmt: skip
    return AttentionPlan(
        cache_seqlens=cache_seqlens if cu_seqlens_k is None else packed_key_lengths(cu_seqlens_k),
        page_table=page_table,
        cu_seqlens_q=cu_seqlens_q,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
        page_size=page_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        head_dim_v=checked.head_dim_v,
        dtype=dtype,
        layer_params=checked.layer_params,
        cu_seqlens_k=cu_seqlens_k,
        key_starts=key_starts,
    )


def bind_attention(
    plan: AttentionPlan, *, params: AttentionParams = DEFAULT_PARAMS, softmax_scale: float | None = None
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """One layer call over ``plan`` with ``params`` and ``softmax_scale`` fixed: ``run(q, k, v, out) -> out``.

    Bind once per step for each (params, scale) the layers use, after ``make_attention_plan``; every layer
    then calls ``run`` (FlashInfer's ``plan()``/``run()``): the cheapest per-layer call an implementation
    offers. A paged plan's run is ``paged_attention_out`` (``k``/``v`` the caches); a packed plan's is
    ``varlen_attention_out`` with the plan's lengths (``k``/``v`` ``[tokens_k, kv_heads, d]``). The run
    refuses bad input as those ops do, before writing; ``out`` may also be ``[tokens, heads, head_dim_v]``
    exactly, the layout kernels write (no view to make). A padded plan's run takes ``[B, S, heads, d]``
    q/k/v/out (:func:`attn_dispatch.validate.validate_padded_run`) and writes every row of ``out``: zeros
    for a query that sees no key.
    """
    validate_bind_attention(plan, params=params, softmax_scale=softmax_scale)

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        # The ops validate their own arguments; a packed plan's layer is checked against the plan first
        # (validate_attention_run's rules, each checked once).
        if plan.page_table is not None:
            return paged_attention_out(q, k, v, out, plan=plan, params=params, softmax_scale=softmax_scale)
        if plan.key_starts is not None:
            validate_padded_run(plan, q, k, v, out)
            return padded_attention_out(q, k, v, out, plan, params, softmax_scale)
        check_packed_layer(plan, q, k, v)
        return varlen_attention_out(
            q, k, v, out, cu_seqlens_q=plan.cu_seqlens_q, cu_seqlens_k=plan.cu_seqlens_k,
            max_seqlen_q=plan.max_seqlen_q, max_seqlen_k=plan.max_seqlen_k, params=params,
            softmax_scale=softmax_scale,
        )  # fmt: skip

    return run


def padded_attention_out(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, plan: AttentionPlan,
    params: AttentionParams, softmax_scale: float | None,
) -> torch.Tensor:  # fmt: skip
    """A padded plan's layer (checked by the caller): row ``b``'s queries over its keys
    ``key_starts[b]:cache_seqlens[b]``, bottom-right aligned; computed into a fresh tensor, copied into ``out``."""
    batch, q_len, heads, head_dim = q.shape
    key_pos = torch.arange(k.shape[1], device=q.device)[None, :]  # [1, S_k]
    start, end = plan.key_starts.long()[:, None], plan.cache_seqlens.long()[:, None]  # [B, 1]
    in_row = (key_pos >= start) & (key_pos < end)  # [B, S_k]
    pos_q = torch.arange(q_len, device=q.device)[None, :, None]  # [1, S_q, 1]
    allowed = visible(pos_q, (key_pos - start)[:, None, :], q_len, (end - start)[:, :, None], params)
    allowed &= in_row[:, None, :]  # [B, S_q, S_k]
    group = heads // plan.num_kv_heads
    keys = k.repeat_interleave(group, dim=2).float()  # [B, S_k, H, d]
    values = torch.where(in_row[:, :, None, None], v, 0).repeat_interleave(group, dim=2).float()  # NaN-safe
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), keys)
    probs = masked_softmax(scores, allowed[:, None], _scale(softmax_scale, head_dim), params.softcap)
    out.copy_(torch.einsum("bhqk,bkhd->bqhd", probs, values).to(q.dtype))
    return out


def packed_key_lengths(cu_seqlens_k: torch.Tensor) -> torch.Tensor:
    """A packed plan's ``cache_seqlens``: each sequence's key count, on the device (no sync)."""
    return (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to(torch.int32)


def paged_attention_out(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    *,
    plan: AttentionPlan,
    params: AttentionParams = DEFAULT_PARAMS,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Paged attention for one layer, written into ``out``; returns ``out``.

    ``q`` ``[tokens, heads, head_dim]`` (tokens may exceed ``cu_seqlens_q[-1]``: padding rows);
    ``k_cache`` ``[pages, page_size, kv_heads, head_dim]``, ``v_cache`` ``[pages, page_size, kv_heads, head_dim_v]``;
    ``out`` ``[>=tokens, heads * head_dim_v]`` or ``[>=tokens, heads, head_dim_v]``.
    """
    out_view = validate_paged_attention_out(q, k_cache, v_cache, out, plan, params, softmax_scale)
    tokens, heads, head_dim = q.shape

    batch, max_pages = plan.page_table.shape
    keys = max_pages * plan.page_size
    k = k_cache[plan.page_table.long()].reshape(batch, keys, plan.num_kv_heads, head_dim)
    v = v_cache[plan.page_table.long()].reshape(batch, keys, plan.num_kv_heads, plan.head_dim_v)
    # Slots past a sequence's length hold whatever the cache held (an engine's torch.empty: NaN, say); a
    # zero probability times NaN is NaN, so they are zeroed, as FlashAttention never reads them.
    written = torch.arange(keys, device=q.device)[None, :] < plan.cache_seqlens.long()[:, None]  # [batch, keys]
    v = torch.where(written[:, :, None, None], v, 0)
    seq_of_token, pos_q, len_q, valid = _segments(plan.cu_seqlens_q, tokens)
    len_k = plan.cache_seqlens.long()[seq_of_token]  # [tokens]
    key_pos = torch.arange(keys, device=q.device)
    allowed = visible(pos_q[:, None], key_pos[None, :], len_q[:, None], len_k[:, None], params)
    allowed &= (key_pos[None, :] < len_k[:, None]) & valid[:, None]

    group = heads // plan.num_kv_heads
    k_tok = k[seq_of_token].repeat_interleave(group, dim=2).float()  # [tokens, keys, heads, d]
    v_tok = v[seq_of_token].repeat_interleave(group, dim=2).float()
    scores = torch.einsum("thd,tkhd->thk", q.float(), k_tok)
    probs = masked_softmax(scores, allowed[:, None, :], _scale(softmax_scale, head_dim), params.softcap)
    result = torch.einsum("thk,tkhd->thd", probs, v_tok).to(q.dtype)  # allocate + compute ...
    out_view.copy_(result)  # ... then the one copy the optimized path removes
    return out


def varlen_attention_out(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    *,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    params: AttentionParams = DEFAULT_PARAMS,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Varlen (packed) prefill attention written into ``out``; returns ``out``.

    ``q`` ``[tokens_q, heads, head_dim]``, ``k`` ``[tokens_k, kv_heads, head_dim]``,
    ``v`` ``[tokens_k, kv_heads, head_dim_v]``; ``cu_seqlens_*`` int32 ``[batch + 1]``.
    """
    out_view = validate_varlen_attention_out(
        q, k, v, out, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, params, softmax_scale
    )
    tokens_q, heads, head_dim = q.shape
    kv_heads = k.shape[1]

    seq_q, pos_q, len_q, valid_q = _segments(cu_seqlens_q, tokens_q)
    seq_k, pos_k, len_k, valid_k = _segments(cu_seqlens_k, k.shape[0])
    allowed = (seq_q[:, None] == seq_k[None, :]) & valid_q[:, None] & valid_k[None, :]
    allowed &= visible(pos_q[:, None], pos_k[None, :], len_q[:, None], len_k[None, :], params)

    group = heads // kv_heads
    scores = torch.einsum("qhd,khd->qhk", q.float(), k.repeat_interleave(group, dim=1).float())
    probs = masked_softmax(scores, allowed[:, None, :], _scale(softmax_scale, head_dim), params.softcap)
    result = torch.einsum("qhk,khd->qhd", probs, v.repeat_interleave(group, dim=1).float()).to(q.dtype)
    out_view.copy_(result)
    return out


def _scale(softmax_scale: float | None, head_dim: int) -> float:
    return head_dim**-0.5 if softmax_scale is None else softmax_scale


def _segments(cu_seqlens: torch.Tensor, tokens: int):
    """Per token: its sequence, its position in it, the sequence's length, and whether it is real."""
    cu = cu_seqlens.long()
    token = torch.arange(tokens, device=cu.device)
    seq = torch.searchsorted(cu[1:], token, right=True).clamp_(max=cu.shape[0] - 2)
    valid = token < cu[-1]
    return seq, token - cu[seq], cu[seq + 1] - cu[seq], valid


def visible(pos_q, pos_k, len_q, len_k, params: AttentionParams) -> torch.Tensor:
    """Bottom-right aligned causal/window visibility, broadcast over its arguments (also the rule of
    cuda_fa3's dense route)."""
    diagonal = pos_q + len_k - len_q  # the key aligned with this query
    left, right = params.window_size
    if params.causal:
        right = 0
    ok = torch.ones_like(pos_k - diagonal, dtype=torch.bool)
    if right >= 0:
        ok &= pos_k <= diagonal + right
    if left >= 0:
        ok &= pos_k >= diagonal - left
    return ok


def masked_softmax(scores: torch.Tensor, allowed: torch.Tensor, scale: float, softcap: float) -> torch.Tensor:
    """Scale, softcap, mask and softmax ``scores``; a row with no allowed key gives zeros."""
    scores = scores * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return probs.nan_to_num(0.0)  # a row with no visible key gives zeros, as FlashAttention does

