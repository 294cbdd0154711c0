"""The "attention_out" op group over one FlashAttention provider: one kernel call into ``out`` per layer.

One route per op, engine to kernel:

* paged, eager: the layer's bound call (looked up in the plan; bound by the step's first layer with those
  params: :func:`.plan.paged_args` + :func:`.binding.bind_layer_call`), the per-call test
  (:func:`.checks.fits_plan`), the call, writing straight into the engine's buffer. No pluggy, no device
  syncs, no data-dependent shapes, so it is CUDA-graph capturable.
* varlen, eager: a call repeating the last one's lengths, shapes and dtype (every layer of a prefill
  step) is one comparison, out's contiguity and the last call's binding; any other call is tested and
  bound afresh (:func:`.binding.bind_varlen_call`).
* a bound run (``bind_attention``, per step): the plan's call bound once, then per layer only the
  per-call test and the call (a paged or a packed plan: the packed one carries FA3's metadata too).
* under torch.compile: the checks run once, at trace time, and the same arguments go through the custom
  op (:mod:`.custom_op`), whose body binds and calls the same way.

Bad input gets a ValueError naming the argument before anything is written: see :mod:`.checks`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from attn_dispatch.plans import DEFAULT_PARAMS, AttentionParams, AttentionPlan
from attn_dispatch.validate import validate_attention_run, validate_bind_attention
from attn_dispatch_flash import FlashProvider

from .binding import LayerCall, bind_layer_call, bind_varlen_call, out_rows, varlen_args
from .checks import check_paged, check_varlen, fits_kernel, fits_plan, name_the_argument
from .custom_op import call_attention_out, route_number
from .plan import FLASH_DTYPES, FlashPlan, check_plan_is_ours, make_plan, paged_args, plan_args


is_compiling = torch.compiler.is_compiling


class AttentionOutOps:
    """``make_attention_plan``, ``paged_attention_out`` and ``varlen_attention_out`` for one provider.

    Signatures and semantics are those of ``attn_dispatch.reference.attention``. ``original=True`` gives the
    pre-optimization path on the same kernels (alloc + copy into ``out``, FA3 scheduling itself in every
    layer), for byte-identity tests and benchmarks (setting ``ATTN_DISPATCH_CUDA_FA3_PATH=original``).
    ``strict`` (the host's ``ATTN_DISPATCH_STRICT``): binding a layer that the known-wrong table lists
    (:mod:`.known_wrong`) raises instead of taking the dense torch route.
    """

    def __init__(self, provider: FlashProvider, *, original: bool = False, strict: bool = False) -> None:
        self.provider = provider
        self.original = original
        self.strict = strict
        self._route = route_number(provider, original, strict)
        # The last varlen call that passed the per-call test: its key (lengths tensors by identity, the
        # max lengths, params, scale, q's/k's/out's shapes, dtype), its binding and out's view, as one
        # tuple (a thread never reads half of it). Every layer of a prefill step repeats it.
        self._last_varlen: tuple | None = None

    def make_attention_plan(
        self,
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
        """Describe one forward batch (paged; packed with ``cu_seqlens_k``; padded with ``key_starts``, FA3
        only) and make FA3's scheduler metadata once per distinct ``layer_params``.

        ``max_seqlen_k`` must bound every ``cache_seqlens`` entry: FA3 schedules for it and widens windows
        that reach past it to unbounded. A CUDA graph serves at most the ``max_seqlen_k`` it was captured
        with, so capture with the largest context it will see (say, ``page_table.shape[1] * page_size``).

        ``static_plan`` (CUDA graphs, plan made outside the graph): refresh that plan's persistent metadata
        buffers instead of allocating; see :mod:`attn_dispatch_cuda_fa3.plan`. A plan made inside a graph
        capture needs no ``static_plan``: its metadata kernel is replayed with the layers.
        """
        return make_plan(
            self.provider, original=self.original, cache_seqlens=cache_seqlens, page_table=page_table,
            cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, key_starts=key_starts, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, page_size=page_size,
            num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, head_dim_v=head_dim_v, dtype=dtype,
            layer_params=layer_params, static_plan=static_plan,
        )  # fmt: skip

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
            check_paged(q, k_cache, v_cache, out, plan, params, softmax_scale, self.provider.name)  # at trace time
            call_attention_out(q, k_cache, v_cache, out, paged_args(plan, params, softmax_scale, self.provider.name), self._route)
            return out
        call = self._bound_paged(plan, params, softmax_scale)
        if not fits_plan(q, k_cache, v_cache, out, plan):
            check_paged(q, k_cache, v_cache, out, plan, params, softmax_scale, self.provider.name)
        try:
            call(q, k_cache, v_cache, out_rows(out, q.shape[0], plan.num_heads, plan.head_dim_v))
        except Exception as exc:
            name_the_argument(exc, check_paged, q, k_cache, v_cache, out, plan, params, softmax_scale, self.provider.name)
            raise
        return out

    def _bind_paged(self, plan: FlashPlan, params: AttentionParams, softmax_scale: float | None) -> LayerCall:
        """Bind the layer's call into the plan (ValueError, naming it, for another's plan or unplanned params)."""
        args = paged_args(plan, params, softmax_scale, self.provider.name)
        shape = (plan.num_heads, plan.num_kv_heads, plan.head_dim)
        call = bind_layer_call(self.provider, args, original=self.original, shape=shape, strict=self.strict)
        plan.layer_calls[(self, params, softmax_scale)] = call
        return call

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
        if is_compiling():
            check_varlen(q, k, v, out, *lengths, params, softmax_scale)  # once, at trace time
            scale = q.shape[2] ** -0.5 if softmax_scale is None else softmax_scale
            call_attention_out(q, k, v, out, varlen_args(*lengths, params, scale), self._route)
            return out
        # A repeat of the last call (every layer of a prefill step): one comparison stands for the per-call
        # test and the binding. The shapes also keep apart layers the known-wrong guard may route differently.
        last = self._last_varlen
        try:
            shapes = (q.shape, k.shape, out.shape)
            repeat = (
                last is not None and last[0] is cu_seqlens_q and last[1] is cu_seqlens_k and last[2] == max_seqlen_q
                and last[3] == max_seqlen_k and (last[4] is params or last[4] == params) and last[5] == softmax_scale
                and last[6] == shapes and q.dtype is last[7] and out.dtype is last[7] and out.is_contiguous()
            )  # fmt: skip
        except AttributeError:  # not a tensor: the detailed check names it
            shapes, repeat = None, False
        if not repeat and not fits_kernel(q, out, max_seqlen_q, max_seqlen_k):
            check_varlen(q, k, v, out, *lengths, params, softmax_scale)
        try:  # q's rank is FA3's check: an IndexError here is named by the detailed check too
            if repeat:
                call, rows = last[8], last[9]
            else:
                call, rows = bind_varlen_call(
                    self.provider, q, k, v, out, *lengths, params, softmax_scale, original=self.original, strict=self.strict
                )  # fmt: skip
                self._last_varlen = (*lengths, params, softmax_scale, shapes, q.dtype, call, rows)
            call(q, k, v, out if rows is None else out_rows(out, *rows))
        except Exception as exc:
            self._last_varlen = None
            name_the_argument(exc, check_varlen, q, k, v, out, *lengths, params, softmax_scale)
            raise
        return out

    def bind_attention(
        self, plan: AttentionPlan, *, params: AttentionParams = DEFAULT_PARAMS, softmax_scale: float | None = None
    ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """``run(q, k, v, out) -> out``: one layer over ``plan`` (paged, packed or padded), the kernel call
        bound now.

        Per call the run compares q's, k's and out's shapes with the last call's that passed the op's detailed
        check (every layer of a step has the same; the check runs again on any change), and q's dtype with
        the plan's: what FA3 cannot check against the plan's metadata, and whether out needs a view. FA3
        checks the rest before it launches (v against k; dtypes, devices and strides against q's), and its
        refusal is named. ``out`` goes to the kernel as it is when it is ``[tokens, heads, head_dim_v]`` (a
        padded plan's: always ``[B, S_q, heads, head_dim_v]``), else viewed so. No lookup, no pluggy.
        Bad input raises the op's ValueError naming the argument before anything is written.
        """
        validate_bind_attention(plan, params=params, softmax_scale=softmax_scale)
        if plan.page_table is not None:
            call = self._bound_paged(plan, params, softmax_scale)
            args = None  # built on demand: only the compiled route needs them
        else:
            args = plan_args(plan, params, softmax_scale, self.provider.name)
            shape = (plan.num_heads, plan.num_kv_heads, plan.head_dim)
            call = bind_layer_call(self.provider, args, original=self.original, shape=shape, strict=self.strict)
        provider_name, route = self.provider.name, self._route
        heads, head_dim_v, dtype = plan.num_heads, plan.head_dim_v, plan.dtype
        padded = plan.key_starts is not None  # [B, S, heads, d] tensors, out as FA3 writes it
        # q's, k's and out's shapes in the last call that passed the detailed check, and whether its out
        # needed a view, as one tuple (a thread never reads one without the other). Every layer of a step passes the
        # same shapes, so the per-call test is one tuple comparison.
        passed: tuple = (None, False)

        def detailed_check(q, k, v, out) -> torch.Tensor:
            check_plan_is_ours(plan, provider_name)
            return validate_attention_run(plan, q, k, v, out, params, softmax_scale, dtypes=FLASH_DTYPES)

        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            nonlocal passed
            if is_compiling():
                detailed_check(q, k, v, out)  # at trace time
                call_attention_out(q, k, v, out, args or plan_args(plan, params, softmax_scale, provider_name), route)
                return out
            passed_shapes, needs_view = passed
            try:
                shapes = (q.shape, k.shape, out.shape)
                fits = shapes == passed_shapes and q.dtype is dtype
            except AttributeError:  # not a tensor: the detailed check names it
                shapes, fits = None, False
            if not fits:
                detailed_check(q, k, v, out)
                needs_view = not padded and (out.dim() != 3 or out.shape[0] != q.shape[0])
                passed = (shapes, needs_view)
            try:  # FA3 checks v and out (shapes, dtypes, devices, strides) against q and k before launching
                call(q, k, v, out_rows(out, q.shape[0], heads, head_dim_v) if needs_view else out)
            except Exception as exc:
                name_the_argument(exc, detailed_check, q, k, v, out)
                raise
            return out

        return run

    def _bound_paged(self, plan: AttentionPlan, params: AttentionParams, softmax_scale: float | None) -> LayerCall:
        """The plan's bound call for these params (shared by ``paged_attention_out`` and the runs)."""
        try:
            return plan.layer_calls[(self, params, softmax_scale)]
        except (AttributeError, KeyError, TypeError):  # a first call with these params, or bad arguments
            return self._bind_paged(plan, params, softmax_scale)

    def as_dict(self) -> dict[str, Callable]:
        return {
            "make_attention_plan": self.make_attention_plan,
            "paged_attention_out": self.paged_attention_out,
            "varlen_attention_out": self.varlen_attention_out,
            "bind_attention": self.bind_attention,
        }


def build_ops(provider: FlashProvider, *, original: bool = False, strict: bool = False) -> dict[str, Callable]:
    """The op dict the plugin registers, for ``provider``: the seam tests and benchmarks use."""
    return AttentionOutOps(provider, original=original, strict=strict).as_dict()
