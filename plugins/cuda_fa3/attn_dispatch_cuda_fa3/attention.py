"""The "attention_out" op group over one FlashAttention provider: one kernel call into ``out`` per layer.

Per paged call: a dict lookup for the layer's kernel call, bound into the plan by the step's first layer
with those params (metadata, plan tensors and ints laid out once: :meth:`FlashProvider.bind`), the few
checks FA3 cannot make itself (see "Checks" below), and the call, writing straight into the engine's
buffer. No pluggy, no device syncs, no data-dependent shapes, so it is CUDA-graph capturable. Bad input
still gets a ValueError naming the argument before anything is written: FA3 refuses it in its host
checks, and the detailed checks here then say which argument it was.

torch.compile: FA3's own op schemas return ``out`` aliased (``Tensor(a!)``), which functionalization cannot
handle. The kernel call is therefore also exposed as the custom op ``attn_dispatch_cuda_fa3::attention_out``
that mutates ``out`` and returns nothing; under compilation the ops call it, and Inductor re-inplaces it
(no clone of ``out``, no copy back). Eagerly they call the same implementation directly, which skips the
dispatcher's overhead for custom ops (150 µs per call seen on a CPU test host outside inference mode).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

import torch
from attn_dispatch.checks import check_tensor, fail, out_rows_view
from attn_dispatch_flash import FlashProvider
from attn_dispatch.plans import DEFAULT_PARAMS, AttentionParams, AttentionPlan

from .plan import FLASH_DTYPES, FlashPlan, make_plan, planned_metadata
from .stats import stats

OP_NAMESPACE = "attn_dispatch_cuda_fa3"
INDEX_DTYPE = torch.int32

# The custom op takes plain values only; providers are passed as an index into this list.
_providers: list[FlashProvider] = []


def provider_index(provider: FlashProvider) -> int:
    for index, known in enumerate(_providers):
        if known is provider:
            return index
    _providers.append(provider)
    return len(_providers) - 1


def bind_layer_call(flash: FlashProvider, *, alloc_and_copy: bool, **static) -> Callable[..., object]:
    """The kernel call for one layer, everything but ``(q, k, v, out_rows)`` fixed now (``static``: the
    keywords of ``FlashProvider.fwd``). ``out_rows`` is ``[tokens, heads, head_dim_v]``; inputs are checked.

    ``alloc_and_copy`` is the original path: the kernel allocates, schedules itself, and the result is
    copied into ``out_rows``. Otherwise the provider writes into ``out_rows`` (or, when it cannot, copies
    once and that copy is counted).
    """
    if alloc_and_copy:
        allocating = flash.bind(**{**static, "scheduler_metadata": None})

        def alloc_then_copy(q, k, v, out_rows) -> None:
            out_rows.copy_(allocating(q, k, v, None))

        return alloc_then_copy
    run = flash.bind(**static)
    if flash.writes_out:
        return run

    def copy_once(q, k, v, out_rows) -> None:
        out_rows.copy_(run(q, k, v, None))
        stats.out_copies += 1

    return copy_once


def _attention_into(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out_rows: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor | None,
    seqused_k: torch.Tensor | None,
    page_table: torch.Tensor | None,
    scheduler_metadata: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    num_splits: int,
    pack_gqa: bool | None,
    provider: int,
    alloc_and_copy: bool,
) -> None:
    """Attention for ``q``'s rows into ``out_rows``, all arguments plain values: the custom op's body."""
    call = bind_layer_call(
        _providers[provider], alloc_and_copy=alloc_and_copy, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        seqused_k=seqused_k, page_table=page_table, scheduler_metadata=scheduler_metadata,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, softmax_scale=softmax_scale, causal=causal,
        window_size=(window_left, window_right), softcap=softcap, num_splits=num_splits, pack_gqa=pack_gqa,
    )  # fmt: skip
    call(q, k, v, out_rows)


# typing.Optional, not `X | None`: the custom op's schema is inferred from these annotations.
def _attention_out(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: Optional[torch.Tensor],
    seqused_k: Optional[torch.Tensor],
    page_table: Optional[torch.Tensor],
    scheduler_metadata: Optional[torch.Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    num_splits: int,
    pack_gqa: Optional[bool],
    provider: int,
    alloc_and_copy: bool,
) -> None:
    """The custom op: attention written into the first ``q.shape[0]`` rows of the engine's ``out``."""
    tokens, heads, _ = q.shape
    out_rows = out[:tokens].view(tokens, heads, v.shape[-1])
    _attention_into(
        q, k, v, out_rows, cu_seqlens_q, cu_seqlens_k, seqused_k, page_table, scheduler_metadata, max_seqlen_q,
        max_seqlen_k, softmax_scale, causal, window_left, window_right, softcap, num_splits, pack_gqa, provider,
        alloc_and_copy,
    )  # fmt: skip


attention_out = torch.library.custom_op(f"{OP_NAMESPACE}::attention_out", mutates_args={"out"})(_attention_out)


@attention_out.register_fake
def _attention_out_fake(q, k, v, out, *args) -> None:
    return None


class AttentionOutOps:
    """``make_attention_plan``, ``paged_attention_out`` and ``varlen_attention_out`` for one provider.

    Signatures and semantics are those of ``attn_dispatch.reference.attention``. ``original=True`` gives the
    pre-optimization path on the same kernels (alloc + copy into ``out``, FA3 scheduling itself in every
    layer), for byte-identity tests and benchmarks.
    """

    def __init__(self, provider: FlashProvider, *, original: bool = False) -> None:
        self.provider = provider
        self.original = original
        self._provider = provider_index(provider)

    def make_attention_plan(
        self,
        *,
        cache_seqlens: torch.Tensor,
        page_table: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        max_seqlen_q: int,
        max_seqlen_k: int,
        page_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        head_dim_v: int | None = None,
        dtype: torch.dtype = torch.bfloat16,
        layer_params: Sequence[AttentionParams] = (DEFAULT_PARAMS,),
        static_plan: AttentionPlan | None = None,
    ) -> AttentionPlan:
        """Describe one forward batch and make FA3's scheduler metadata once per distinct ``layer_params``.

        ``max_seqlen_k`` must bound every ``cache_seqlens`` entry: FA3 schedules for it and widens windows
        that reach past it to unbounded. A CUDA graph serves at most the ``max_seqlen_k`` it was captured
        with, so capture with the largest context it will see (say, ``page_table.shape[1] * page_size``).

        ``static_plan`` (CUDA graphs, plan made outside the graph): refresh that plan's persistent metadata
        buffers instead of allocating; see :mod:`attn_dispatch_cuda_fa3.plan`. A plan made inside a graph
        capture needs no ``static_plan``: its metadata kernel is replayed with the layers.
        """
        return make_plan(
            self.provider,
            precompute=not self.original,
            cache_seqlens=cache_seqlens,
            page_table=page_table,
            cu_seqlens_q=cu_seqlens_q,
            max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k,
            page_size=page_size,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            head_dim_v=head_dim_v,
            dtype=dtype,
            layer_params=layer_params,
            static_plan=static_plan,
        )

    def paged_attention_out(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        out: torch.Tensor,
        *,
        plan: AttentionPlan,
        params: AttentionParams = DEFAULT_PARAMS,
        softmax_scale: float | None = None,
    ) -> torch.Tensor:
        """Paged attention for one layer, written into ``out``; returns ``out``. ``params`` must be planned."""
        if torch.compiler.is_compiling():
            return self._traced_paged_attention_out(q, k_cache, v_cache, out, plan, params, softmax_scale)
        call = self._planned_call(plan, params, softmax_scale)
        if not _fits_plan(q, k_cache, v_cache, out, plan):
            _check_paged_in_detail(q, k_cache, v_cache, out, plan)
        try:
            call(q, k_cache, v_cache, _rows(out, q.shape[0], plan.num_heads, plan.head_dim_v))
        except Exception as exc:
            _name_the_argument(exc, _check_paged_in_detail, q, k_cache, v_cache, out, plan)
            raise
        return out

    def _planned_call(self, plan: AttentionPlan, params: AttentionParams, softmax_scale: float | None) -> Callable:
        """The layer's kernel call with the plan's tensors, metadata and ints bound: made by the first layer
        that asks for ``params`` and kept in the plan, so every later layer of the step only looks it up."""
        key = (self, params, softmax_scale)
        try:
            return plan.layer_calls[key]
        except (AttributeError, KeyError):  # not this plugin's plan (refused below), or a first call
            pass
        metadata = planned_metadata(plan, params, self.provider.name)
        left, right = params.window_size
        call = bind_layer_call(
            self.provider, alloc_and_copy=self.original, cu_seqlens_q=plan.cu_seqlens_q, seqused_k=plan.cache_seqlens,
            page_table=plan.page_table, scheduler_metadata=metadata, max_seqlen_q=plan.max_seqlen_q,
            max_seqlen_k=plan.max_seqlen_k, softmax_scale=_scale(softmax_scale, plan.head_dim), causal=params.causal,
            window_size=(left, right), softcap=params.softcap, num_splits=params.num_splits, pack_gqa=params.pack_gqa,
        )  # fmt: skip
        plan.layer_calls[key] = call
        return call

    def _traced_paged_attention_out(self, q, k_cache, v_cache, out, plan, params, softmax_scale) -> torch.Tensor:
        """Under torch.compile: the checks run once, at trace time; the kernel runs as the custom op."""
        metadata = planned_metadata(plan, params, self.provider.name)
        _check_paged_in_detail(q, k_cache, v_cache, out, plan)
        left, right = params.window_size
        attention_out(
            q, k_cache, v_cache, out, plan.cu_seqlens_q, None, plan.cache_seqlens, plan.page_table, metadata,
            plan.max_seqlen_q, plan.max_seqlen_k, _scale(softmax_scale, plan.head_dim), params.causal, left, right,
            params.softcap, params.num_splits, params.pack_gqa, self._provider, self.original,
        )  # fmt: skip
        return out

    def varlen_attention_out(
        self,
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
        """Varlen (packed) prefill written into ``out``; returns ``out``. FA3 schedules it in the kernel
        (a prefill batch is one call per layer with nothing shared to precompute across calls)."""
        lengths = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        compiling = torch.compiler.is_compiling()
        if compiling or not _fits_kernel(q, out, max_seqlen_q, max_seqlen_k):
            _check_varlen_in_detail(q, k, v, out, *lengths)  # under torch.compile: once, at trace time
        left, right = params.window_size
        args = (
            cu_seqlens_q, cu_seqlens_k, None, None, None, max_seqlen_q, max_seqlen_k,
            _scale(softmax_scale, q.shape[2]), params.causal, left, right, params.softcap, params.num_splits,
            params.pack_gqa, self._provider, self.original,
        )  # fmt: skip
        if compiling:
            attention_out(q, k, v, out, *args)
            return out
        try:
            _attention_into(q, k, v, _rows(out, q.shape[0], q.shape[1], v.shape[2]), *args)
        except Exception as exc:
            _name_the_argument(exc, _check_varlen_in_detail, q, k, v, out, *lengths)
            raise
        return out

    def as_dict(self) -> dict[str, Callable]:
        return {
            "make_attention_plan": self.make_attention_plan,
            "paged_attention_out": self.paged_attention_out,
            "varlen_attention_out": self.varlen_attention_out,
        }


def build_ops(provider: FlashProvider, *, original: bool = False) -> dict[str, Callable]:
    """The op dict the plugin registers, for ``provider``: the seam tests and benchmarks use."""
    return AttentionOutOps(provider, original=original).as_dict()


# Checks. Per call only what FA3 cannot check runs in Python: that the layer matches the plan its metadata
# was made for (FA3 checks only the metadata's length, so a mismatch misschedules without a word, and it
# launches on q's GPU, so q must be on the plan's), that `out` is contiguous (its rows are viewed as
# [tokens, heads, head_dim_v]) with q's dtype (FA3 never sees `out` when it cannot write into it, and a
# copy_ would convert silently), and that the max lengths are positive. Dtypes, shapes, strides and "is on a
# GPU" are FA3's own host checks, made before it launches anything; when the kernel call raises, the
# detailed checks below run and name the bad argument (ValueError, chained to the kernel's error), and
# nothing has been written. Like FA3, the per-call path does not compare the GPUs of k, v and out with
# q's (a few hundred ns per layer); the detailed checks do, when something fails.


def _fits_plan(q, k_cache, v_cache, out, plan: FlashPlan) -> bool:
    try:
        return (
            q.dtype == plan.dtype and q.shape[1:] == plan.q_tail and q.get_device() == plan.device_index
            and k_cache.shape[1:] == plan.k_cache_tail and v_cache.shape[1:] == plan.v_cache_tail
            and out.dtype == plan.dtype and out.is_contiguous()
        )  # fmt: skip
    except (AttributeError, TypeError):  # not a tensor: the detailed check says which
        return False


def _fits_kernel(q, out, max_seqlen_q, max_seqlen_k) -> bool:
    try:
        return out.dtype == q.dtype and out.is_contiguous() and max_seqlen_q > 0 and max_seqlen_k > 0
    except (AttributeError, TypeError):
        return False


def _name_the_argument(exc: Exception, detailed_check: Callable, *args) -> None:
    """Raise the detailed check's ValueError (naming the argument) in place of the kernel's ``exc``, if it
    finds one; otherwise return, and the caller re-raises ``exc`` unchanged."""
    try:
        detailed_check(*args)
    except ValueError as named:
        raise named from exc


def _rows(out: torch.Tensor, tokens: int, heads: int, head_dim_v: int) -> torch.Tensor:
    return (out if out.shape[0] == tokens else out[:tokens]).view(tokens, heads, head_dim_v)


def _check_paged_in_detail(q, k_cache, v_cache, out, plan: FlashPlan) -> torch.Tensor:
    device, dtype = plan.cache_seqlens.device, plan.dtype
    _expect("q", q, 3, dtype, device)
    if q.shape[1] != plan.num_heads or q.shape[2] != plan.head_dim:
        fail("q", f"shape {tuple(q.shape)} does not match the plan ({plan.num_heads} heads, head_dim {plan.head_dim})")
    _expect("k_cache", k_cache, 4, dtype, device)
    _expect("v_cache", v_cache, 4, dtype, device)
    pages = k_cache.shape[0]
    for name, cache, dim in (("k_cache", k_cache, plan.head_dim), ("v_cache", v_cache, plan.head_dim_v)):
        expected = (pages, plan.page_size, plan.num_kv_heads, dim)
        if cache.shape != expected:
            fail(name, f"expected shape [pages={pages}, page_size, kv_heads, head_dim] = {list(expected)}, got {list(cache.shape)}")
    return out_rows_view(out, q.shape[0], plan.num_heads, plan.head_dim_v, like=q)


def _check_varlen_in_detail(q, k, v, out, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> torch.Tensor:
    if not isinstance(q, torch.Tensor) or q.dtype not in FLASH_DTYPES:
        check_tensor("q", q, ndim=3, dtype=FLASH_DTYPES)  # raises, naming q
    dtype, device = q.dtype, q.device
    _expect("q", q, 3, dtype, device)
    _expect("k", k, 3, dtype, device)
    _expect("v", v, 3, dtype, device)
    _expect("cu_seqlens_q", cu_seqlens_q, 1, INDEX_DTYPE, device)
    _expect("cu_seqlens_k", cu_seqlens_k, 1, INDEX_DTYPE, device)
    if cu_seqlens_k.shape != cu_seqlens_q.shape:
        fail("cu_seqlens_k", f"has {cu_seqlens_k.shape[0]} entries but cu_seqlens_q has {cu_seqlens_q.shape[0]}")
    heads, kv_heads = q.shape[1], k.shape[1]
    if kv_heads <= 0 or heads % kv_heads:
        fail("q", f"{heads} heads is not divisible by the {kv_heads} heads of k")
    if k.shape[2] != q.shape[2]:
        fail("k", f"head_dim {k.shape[2]} differs from q's {q.shape[2]}")
    if v.shape[0] != k.shape[0] or v.shape[1] != kv_heads:
        fail("v", f"shape {tuple(v.shape)} does not match k's tokens and heads {tuple(k.shape[:2])}")
    if max_seqlen_q <= 0 or max_seqlen_k <= 0:
        fail("max_seqlen_q" if max_seqlen_q <= 0 else "max_seqlen_k", f"must be positive, got {min(max_seqlen_q, max_seqlen_k)}")
    return out_rows_view(out, q.shape[0], heads, v.shape[2], like=q)


def _expect(name: str, t: torch.Tensor, ndim: int, dtype: torch.dtype, device: torch.device) -> None:
    """A tensor argument FA3 can read: one combined test per call (this runs per layer); on failure the
    detailed check raises the ValueError that names what is wrong."""
    if isinstance(t, torch.Tensor) and t.dim() == ndim and t.dtype == dtype and t.device == device and t.stride(-1) == 1:
        return
    check_tensor(name, t, ndim=ndim, dtype=dtype, device=device)
    fail(name, f"must be contiguous in its last dim (strides {t.stride()})")


def _scale(softmax_scale: float | None, head_dim: int) -> float:
    return head_dim**-0.5 if softmax_scale is None else softmax_scale
