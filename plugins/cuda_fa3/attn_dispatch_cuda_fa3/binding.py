"""A layer's kernel call with everything but its tensors fixed: the one route from the ops to the provider.

Eagerly, the ops call a bound :data:`LayerCall` straight away: for paged attention the step's first layer
with given params binds it into the plan (``FlashPlan.layer_calls``) and every later layer looks it up; for
varlen attention the ops keep the last call's binding (:func:`bind_varlen_call`) while the engine repeats
that call (every layer of a prefill step). Under torch.compile the custom op (:mod:`.custom_op`) binds the same way in its
body, from the same :class:`~attn_dispatch_flash.FlashArgs`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from attn_dispatch.plans import AttentionParams
from attn_dispatch_flash import FlashArgs, FlashProvider

from .known_wrong import Layer, guard
from .stats import stats

# call(q, k, v, out_rows): attention written into out_rows, [tokens, heads, head_dim_v] (the engine's rows).
LayerCall = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], object]


def bind_layer_call(
    provider: FlashProvider, args: FlashArgs, *, original: bool, shape: tuple[int, int, int], strict: bool = False
) -> LayerCall:
    """The provider's call with ``args`` fixed, writing into ``out_rows``.

    ``shape`` is the layer's ``(heads, kv_heads, head_dim)``: with ``args``, what the known-wrong guard
    looks up (:mod:`.known_wrong`). A listed layer gets the dense torch route on both paths (the original
    path's kernel is the same wrong one), or :class:`~.known_wrong.KnownWrongConfiguration` when ``strict``.

    ``original`` is the pre-optimization path on the same kernels: the kernel allocates its output and
    schedules itself (any metadata in ``args`` is dropped), and the result is copied into ``out_rows``.
    Otherwise the provider writes into ``out_rows``, or, when it cannot (``writes_out=False``), its result
    is copied once and that copy is counted in ``stats.out_copies``.
    """
    guarded = guard(provider, args, Layer.of(args, *shape), strict=strict)
    if guarded is not None:
        return guarded
    if original:
        allocating = provider.bind(args._replace(scheduler_metadata=None))

        def alloc_then_copy(q, k, v, out_rows) -> None:
            _copy_into(out_rows, allocating(q, k, v, None))

        return alloc_then_copy
    run = provider.bind(args)
    if provider.writes_out:
        return run

    def copy_once(q, k, v, out_rows) -> None:
        _copy_into(out_rows, run(q, k, v, None))
        stats.out_copies += 1

    return copy_once


def _copy_into(out_rows: torch.Tensor, result: torch.Tensor) -> None:
    """``copy_`` would copy across devices or convert dtypes without a word; FA3, handed ``out``, refuses
    both. Raise, so the caller's detailed check names ``out`` (nothing of it written)."""
    if out_rows.device != result.device or out_rows.dtype != result.dtype:
        raise RuntimeError(f"out is {out_rows.dtype} on {out_rows.device}, the kernel's result {result.dtype} on {result.device}")
    out_rows.copy_(result)


def varlen_args(
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    params: AttentionParams,
    softmax_scale: float,
) -> FlashArgs:
    """A packed (non-paged) call's kernel arguments; FA3 schedules it in the kernel (no metadata)."""
    return FlashArgs(
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
        softmax_scale=softmax_scale, causal=params.causal, window_size=params.window_size, softcap=params.softcap,
        num_splits=params.num_splits, pack_gqa=params.pack_gqa,
    )  # fmt: skip


def bind_varlen_call(
    provider: FlashProvider, q, k, v, out, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
    params: AttentionParams, softmax_scale: float | None, *, original: bool, strict: bool = False,
) -> tuple[LayerCall, tuple[int, int, int] | None]:
    """A varlen call's binding, for a call that passed the per-call test: ``(call, rows)``, ``rows`` the
    ``[tokens, heads, head_dim_v]`` shape ``out`` is viewed as (None: ``out`` is that already). The ops
    keep the last one and reuse it while calls repeat it (every layer of a prefill step)."""
    scale = q.shape[2] ** -0.5 if softmax_scale is None else softmax_scale
    args = varlen_args(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, params, scale)
    call = bind_layer_call(provider, args, original=original, shape=(q.shape[1], k.shape[1], q.shape[2]), strict=strict)
    tokens = q.shape[0]
    return call, None if out.dim() == 3 and out.shape[0] == tokens else (tokens, q.shape[1], v.shape[2])


def out_rows(out: torch.Tensor, tokens: int, heads: int, head_dim_v: int) -> torch.Tensor:
    """The engine's ``out`` (flat ``[rows, heads * dv]`` or ``[rows, heads, dv]``, rows >= tokens) as the
    kernel's ``[tokens, heads, dv]`` view; the caller has checked it (``checks``)."""
    return (out if out.shape[0] == tokens else out[:tokens]).view(tokens, heads, head_dim_v)
