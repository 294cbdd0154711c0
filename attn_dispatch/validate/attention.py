"""Rules of the ``attention_out`` group: ``make_attention_plan``, ``paged_attention_out``, ``varlen_attention_out``,
``bind_attention`` and its run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from ..checks import (
    FLOAT_DTYPES,
    INDEX_DTYPE,
    check_dtype_arg,
    check_instance,
    check_int,
    check_last_dim_contiguous,
    check_scale,
    check_tensor,
    fail,
    out_rows_view,
)
from ..plans import DEFAULT_PARAMS, AttentionParams, AttentionPlan


class PlanArgs(NamedTuple):
    """``make_attention_plan``'s arguments that need normalising."""

    head_dim_v: int
    layer_params: tuple[AttentionParams, ...]  # distinct, in the order given


def validate_make_attention_plan(
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
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
) -> PlanArgs:
    """Rules of ``make_attention_plan``. ``dtypes``: the dtypes the caller's kernels take (named ``dtype``).

    A paged plan takes ``cache_seqlens``, ``page_table``, ``page_size`` and ``cu_seqlens_q``; a packed plan
    ``cu_seqlens_q`` and ``cu_seqlens_k`` (its key lengths are ``cu_seqlens_k``'s segments); a padded plan
    ``cache_seqlens`` (each row's key end) and ``key_starts``. Each refuses the others' arguments.
    """
    if cu_seqlens_k is not None and key_starts is not None:
        fail("key_starts", "must be None in a packed plan (cu_seqlens_k given): a plan is paged, packed or padded")
    if cu_seqlens_k is not None:
        _check_packed_batch(cache_seqlens, page_table, cu_seqlens_q, cu_seqlens_k, page_size, static_plan)
    elif key_starts is not None:
        _check_padded_batch(cache_seqlens, page_table, cu_seqlens_q, key_starts, page_size, static_plan)
    else:
        _check_paged_batch(cache_seqlens, page_table, cu_seqlens_q, page_size, max_seqlen_k)
    check_int("num_heads", num_heads)
    check_int("num_kv_heads", num_kv_heads)
    if num_heads % num_kv_heads:
        fail("num_heads", f"{num_heads} is not divisible by num_kv_heads={num_kv_heads}")
    check_int("head_dim", head_dim)
    head_dim_v = head_dim if head_dim_v is None else check_int("head_dim_v", head_dim_v)
    check_int("max_seqlen_q", max_seqlen_q)
    check_int("max_seqlen_k", max_seqlen_k)
    check_dtype_arg("dtype", dtype, dtypes)
    if static_plan is not None:
        check_instance("static_plan", static_plan, AttentionPlan, " or None")
    return PlanArgs(head_dim_v, distinct_layer_params(layer_params))


def _check_paged_batch(cache_seqlens, page_table, cu_seqlens_q, page_size, max_seqlen_k) -> None:
    required = (("cache_seqlens", cache_seqlens), ("page_table", page_table), ("page_size", page_size), ("cu_seqlens_q", cu_seqlens_q))
    missing = [name for name, value in required if value is None]
    if missing:
        fail(missing[0], "is required: a paged plan takes cache_seqlens, page_table, page_size and cu_seqlens_q (a packed plan: cu_seqlens_q and cu_seqlens_k; a padded one: cache_seqlens and key_starts)")
    check_tensor("cache_seqlens", cache_seqlens, ndim=1, dtype=INDEX_DTYPE)
    device, batch = cache_seqlens.device, cache_seqlens.shape[0]
    check_tensor("page_table", page_table, ndim=2, dtype=INDEX_DTYPE, device=device)
    check_tensor("cu_seqlens_q", cu_seqlens_q, ndim=1, dtype=INDEX_DTYPE, device=device)
    if page_table.shape[0] != batch:
        fail("page_table", f"has {page_table.shape[0]} rows but cache_seqlens has batch {batch}")
    if cu_seqlens_q.shape[0] != batch + 1:
        fail("cu_seqlens_q", f"expected {batch + 1} entries (batch + 1), got {cu_seqlens_q.shape[0]}")
    _check_contiguous(cache_seqlens=cache_seqlens, cu_seqlens_q=cu_seqlens_q)
    check_last_dim_contiguous("page_table", page_table)
    check_int("page_size", page_size)
    check_int("max_seqlen_k", max_seqlen_k)
    capacity = page_table.shape[1] * page_size
    if max_seqlen_k > capacity:
        fail("max_seqlen_k", f"{max_seqlen_k} exceeds the page table's {capacity} keys (columns x page_size)")


def _check_packed_batch(cache_seqlens, page_table, cu_seqlens_q, cu_seqlens_k, page_size, static_plan) -> None:
    _refuse_others("packed", "(cu_seqlens_k given): key lengths are cu_seqlens_k's segments", static_plan,
                   cache_seqlens=cache_seqlens, page_table=page_table, page_size=page_size)  # fmt: skip
    if cu_seqlens_q is None:
        fail("cu_seqlens_q", "is required in a packed plan (cu_seqlens_k given): query tokens per sequence")
    check_tensor("cu_seqlens_q", cu_seqlens_q, ndim=1, dtype=INDEX_DTYPE)
    check_tensor("cu_seqlens_k", cu_seqlens_k, ndim=1, dtype=INDEX_DTYPE, device=cu_seqlens_q.device)
    if cu_seqlens_q.shape[0] < 2:
        fail("cu_seqlens_q", f"expected batch + 1 >= 2 entries, got {cu_seqlens_q.shape[0]}")
    if cu_seqlens_k.shape[0] != cu_seqlens_q.shape[0]:
        fail("cu_seqlens_k", f"expected {cu_seqlens_q.shape[0]} entries, as cu_seqlens_q, got {cu_seqlens_k.shape[0]}")
    _check_contiguous(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)


def _check_padded_batch(cache_seqlens, page_table, cu_seqlens_q, key_starts, page_size, static_plan) -> None:
    _refuse_others("padded", "(key_starts given): every row has max_seqlen_q queries", static_plan,
                   page_table=page_table, page_size=page_size, cu_seqlens_q=cu_seqlens_q)  # fmt: skip
    if cache_seqlens is None:
        fail("cache_seqlens", "is required in a padded plan: each row's key end (keys key_starts[b]:cache_seqlens[b])")
    check_tensor("cache_seqlens", cache_seqlens, ndim=1, dtype=INDEX_DTYPE)
    check_tensor("key_starts", key_starts, ndim=1, dtype=INDEX_DTYPE, device=cache_seqlens.device)
    if key_starts.shape != cache_seqlens.shape:
        fail("key_starts", f"has {key_starts.shape[0]} entries but cache_seqlens has batch {cache_seqlens.shape[0]}")
    if cache_seqlens.shape[0] < 1:
        fail("cache_seqlens", "expected a batch of at least one row, got 0 entries")
    _check_contiguous(cache_seqlens=cache_seqlens, key_starts=key_starts)


def _refuse_others(kind: str, why: str, static_plan, **others) -> None:
    """A packed or padded plan takes none of ``others`` (another kind's arguments) and no ``static_plan``."""
    for name, value in others.items():
        if value is not None:
            fail(name, f"must be None in a {kind} plan {why}")
    if static_plan is not None:
        fail("static_plan", f"applies to paged plans only; make a {kind} plan inside the graph capture instead")


def _check_contiguous(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if not t.is_contiguous():
            fail(name, f"must be contiguous (strides {t.stride()})")


def distinct_layer_params(layer_params: Sequence[AttentionParams] | AttentionParams) -> tuple[AttentionParams, ...]:
    if isinstance(layer_params, AttentionParams):
        layer_params = (layer_params,)
    try:
        distinct = tuple(dict.fromkeys(layer_params))
    except TypeError:  # not iterable, or unhashable items
        distinct = ()
    if not distinct or not all(isinstance(p, AttentionParams) for p in distinct):
        fail("layer_params", f"expected a non-empty sequence of AttentionParams, got {layer_params!r}")
    return distinct


def validate_paged_attention_out(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    plan: AttentionPlan,
    params: AttentionParams = DEFAULT_PARAMS,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Rules of ``paged_attention_out``; returns ``out``'s first ``q.shape[0]`` rows as ``[tokens, heads, head_dim_v]``."""
    check_planned(plan, params, softmax_scale)
    if plan.page_table is None:
        fail("plan", f"is a {plan.kind} plan (made without a page table): run it through bind_attention")
    device, dtype = plan.cache_seqlens.device, plan.dtype
    check_tensor("q", q, ndim=3, device=device)
    if q.dtype != dtype:
        fail("q", f"dtype {q.dtype} differs from the plan's dtype {dtype}")
    if q.shape[1:] != (plan.num_heads, plan.head_dim):
        fail("q", f"shape {tuple(q.shape)} does not match the plan ({plan.num_heads} heads, head_dim {plan.head_dim})")
    check_last_dim_contiguous("q", q)
    pages = None
    for name, cache, dim in (("k_cache", k_cache, plan.head_dim), ("v_cache", v_cache, plan.head_dim_v)):
        check_tensor(name, cache, ndim=4, dtype=dtype, device=device)
        pages = cache.shape[0] if pages is None else pages
        expected = (pages, plan.page_size, plan.num_kv_heads, dim)
        if cache.shape != expected:
            fail(name, f"expected [pages, page_size, kv_heads, head_dim] = {list(expected)}, got {list(cache.shape)}")
        check_last_dim_contiguous(name, cache)
    return out_rows_view(out, q.shape[0], plan.num_heads, plan.head_dim_v, like=q)


def validate_varlen_attention_out(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    params: AttentionParams = DEFAULT_PARAMS,
    softmax_scale: float | None = None,
    *,
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
) -> torch.Tensor:
    """Rules of ``varlen_attention_out``; returns ``out``'s first rows as ``[tokens_q, heads, head_dim_v]``.

    ``dtypes``: the dtypes the caller's kernels take (named ``q``).
    """
    check_tensor("q", q, ndim=3, dtype=tuple(dtypes))
    dtype, device = q.dtype, q.device
    check_tensor("k", k, ndim=3, dtype=dtype, device=device)
    check_tensor("v", v, ndim=3, dtype=dtype, device=device)
    heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k.shape[1]
    if head_dim == 0 or heads == 0:
        fail("q", f"needs at least one head and head_dim > 0, got shape {tuple(q.shape)}")
    if kv_heads == 0 or heads % kv_heads:
        fail("q", f"{heads} heads is not a multiple of the {kv_heads} heads of k (GQA groups must divide)")
    if k.shape[2] != head_dim:
        fail("k", f"head_dim {k.shape[2]} differs from q's {head_dim}")
    if v.shape[:2] != k.shape[:2]:
        fail("v", f"shape {tuple(v.shape)} does not match k's [tokens, kv_heads] {tuple(k.shape[:2])}")
    if v.shape[2] == 0:
        fail("v", f"needs head_dim_v > 0, got shape {tuple(v.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_last_dim_contiguous(name, t)
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        check_tensor(name, cu, ndim=1, dtype=INDEX_DTYPE, device=device)
        if cu.shape[0] < 2 or not cu.is_contiguous():
            fail(name, f"expected a contiguous [batch + 1] tensor with batch >= 1, got shape {tuple(cu.shape)}")
    if cu_seqlens_k.shape != cu_seqlens_q.shape:
        fail("cu_seqlens_k", f"has {cu_seqlens_k.shape[0]} entries but cu_seqlens_q has {cu_seqlens_q.shape[0]}")
    check_int("max_seqlen_q", max_seqlen_q)
    check_int("max_seqlen_k", max_seqlen_k)
    check_instance("params", params, AttentionParams)
    check_scale(softmax_scale)
    return out_rows_view(out, q.shape[0], heads, v.shape[2], like=q)


def check_planned(plan: AttentionPlan, params: AttentionParams, softmax_scale: float | None) -> None:
    """``plan`` is a plan, ``params`` one it was planned for, ``softmax_scale`` None or a positive float."""
    check_instance("plan", plan, AttentionPlan, " from make_attention_plan")
    check_instance("params", params, AttentionParams)
    if params not in plan.layer_params:
        fail("params", f"{params} is not among the plan's layer_params {plan.layer_params}; list it in make_attention_plan(layer_params=...)")
    check_scale(softmax_scale)


def validate_bind_attention(
    plan: AttentionPlan, *, params: AttentionParams = DEFAULT_PARAMS, softmax_scale: float | None = None
) -> None:
    """Rules of ``bind_attention`` (the run's own rules: :func:`validate_attention_run`)."""
    check_planned(plan, params, softmax_scale)


def validate_attention_run(
    plan: AttentionPlan,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    params: AttentionParams = DEFAULT_PARAMS,
    softmax_scale: float | None = None,
    *,
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
) -> torch.Tensor:
    """Rules of a call of ``bind_attention``'s run: ``paged_attention_out``'s for a paged plan; for a packed
    plan ``varlen_attention_out``'s with the plan's lengths, and q/k/v as the plan describes them; for a
    padded plan :func:`validate_padded_run`'s. Returns ``out``'s row view, as those do (padded: ``out``)."""
    if plan.page_table is not None:
        return validate_paged_attention_out(q, k, v, out, plan, params, softmax_scale)
    if plan.key_starts is not None:
        check_planned(plan, params, softmax_scale)
        return validate_padded_run(plan, q, k, v, out)
    check_packed_layer(plan, q, k, v)
    return validate_varlen_attention_out(
        q, k, v, out, plan.cu_seqlens_q, plan.cu_seqlens_k, plan.max_seqlen_q, plan.max_seqlen_k, params,
        softmax_scale, dtypes=dtypes,
    )  # fmt: skip


def check_packed_layer(plan: AttentionPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q/k/v as a packed plan describes them (dtype, device, heads, head dims); the rest of a packed run's
    rules are ``varlen_attention_out``'s with the plan's lengths."""
    check_tensor("q", q, ndim=3, device=plan.cu_seqlens_q.device)
    if q.dtype != plan.dtype:
        fail("q", f"dtype {q.dtype} differs from the plan's dtype {plan.dtype}")
    if q.shape[1:] != (plan.num_heads, plan.head_dim):
        fail("q", f"shape {tuple(q.shape)} does not match the plan ({plan.num_heads} heads, head_dim {plan.head_dim})")
    for name, t, dim in (("k", k, plan.head_dim), ("v", v, plan.head_dim_v)):
        check_tensor(name, t, ndim=3, dtype=plan.dtype, device=q.device)
        if t.shape[1:] != (plan.num_kv_heads, dim):
            fail(name, f"shape {tuple(t.shape)} does not match the plan ({plan.num_kv_heads} kv heads, head_dim {dim})")


def validate_padded_run(
    plan: AttentionPlan,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """A padded plan's layer tensors: ``q`` ``[B, max_seqlen_q, heads, head_dim]``, ``k``
    ``[B, max_seqlen_k, kv_heads, head_dim]``, ``v`` ``[B, max_seqlen_k, kv_heads, head_dim_v]``, ``out``
    ``[B, max_seqlen_q, heads, head_dim_v]``: the plan's dtype and device, each
    contiguous in its last dim (any other strides: transformers' ``[B, H, S, D]`` tensors transposed).
    Returns ``out``. The plan's key ends and starts are device values: not checked on the host."""
    batch, device = plan.batch_size, plan.cache_seqlens.device
    expected = {
        "q": (batch, plan.max_seqlen_q, plan.num_heads, plan.head_dim),
        "k": (batch, plan.max_seqlen_k, plan.num_kv_heads, plan.head_dim),
        "v": (batch, plan.max_seqlen_k, plan.num_kv_heads, plan.head_dim_v),
        "out": (batch, plan.max_seqlen_q, plan.num_heads, plan.head_dim_v),
    }
    for name, t in (("q", q), ("k", k), ("v", v), ("out", out)):
        check_tensor(name, t, ndim=4, dtype=plan.dtype, device=device)
        if tuple(t.shape) != expected[name]:
            fail(name, f"expected [batch, seqlen, heads, head_dim] = {list(expected[name])} (the padded plan's), got {list(t.shape)}")
        check_last_dim_contiguous(name, t)
    return out
