"""A layer's kernel call with everything but its tensors fixed: the one route from the ops to the provider.

Eagerly, the ops call a bound :data:`LayerCall` straight away: for paged attention the step's first layer
with given params binds it into the plan (``FlashPlan.layer_calls``) and every later layer looks it up; for
varlen attention :class:`LastVarlenCall` keeps the binding while the engine passes the same lengths (every
layer of a prefill step). Under torch.compile the custom op (:mod:`.custom_op`) binds the same way in its
body, from the same :class:`~attn_dispatch_flash.FlashArgs`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from attn_dispatch.plans import AttentionParams
from attn_dispatch_flash import FlashArgs, FlashProvider

from .known_wrong import Layer, classes_for, guard
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


class LastVarlenCall:
    """The last varlen binding of one ops object, reused while the lengths stay the same.

    The key compares ``cu_seqlens_q``/``cu_seqlens_k`` by identity (the kernel reads their current values
    at every call, so an engine refilling the same tensors in place keeps its binding) and the host values
    by equality, plus the layer's shape where the known-wrong table lists the provider. It holds a reference
    to the last lengths' tensors until the next binding. The key and the call are stored as one tuple, so a
    thread never reads one without the other.
    """

    def __init__(self, provider: FlashProvider, original: bool, strict: bool = False) -> None:
        self.provider, self.original, self.strict = provider, original, strict
        self._last: tuple | None = None
        # A binding depends on the layer's shape only through the known-wrong guard: only a provider the
        # table lists pays for comparing shapes too.
        self._shape_matters = bool(classes_for(provider))

    def get(self, q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, params, softmax_scale) -> LayerCall:
        """The bound call for these lengths; ``q`` and ``k`` are read only when binding (their shapes, for
        the known-wrong guard)."""
        last = self._last
        shape = (q.shape[1], k.shape[1], q.shape[2]) if self._shape_matters else None
        if (
            last is not None and last[0] is cu_seqlens_q and last[1] is cu_seqlens_k and last[2] == max_seqlen_q
            and last[3] == max_seqlen_k and (last[4] is params or last[4] == params) and last[5] == softmax_scale
            and last[6] == shape
        ):  # fmt: skip
            return last[7]
        args = varlen_args(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, params, softmax_scale)
        layer_shape = shape or (q.shape[1], k.shape[1], q.shape[2])
        call = bind_layer_call(self.provider, args, original=self.original, shape=layer_shape, strict=self.strict)
        self._last = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, params, softmax_scale, shape, call)
        return call


def out_rows(out: torch.Tensor, tokens: int, heads: int, head_dim_v: int) -> torch.Tensor:
    """The engine's ``out`` (flat ``[rows, heads * dv]`` or ``[rows, heads, dv]``, rows >= tokens) as the
    kernel's ``[tokens, heads, dv]`` view; the caller has checked it (``checks``)."""
    return (out if out.shape[0] == tokens else out[:tokens]).view(tokens, heads, head_dim_v)
