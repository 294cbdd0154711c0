"""The per-batch plan: FA3 scheduler metadata made once per distinct scheduling key, read by every layer.

FA3 checks only the metadata's length, dtype, device and contiguity; a forward scheduled differently from
the metadata it is handed reads it wrongly, without a word. So the plan keys metadata by the layer's whole
:class:`AttentionParams` (causal, window, softcap, num_splits, pack_gqa; head dims are plan-wide) and a
layer asking for params that were not planned is refused (:func:`paged_args`).

CUDA graphs, two ways (the calls are the engine's ``ops.make_attention_plan``):

* Plan inside the graph. Call ``make_attention_plan`` inside the capture, before the layers: the metadata
  kernel is captured with them and re-reads the engine's static ``cache_seqlens`` / ``cu_seqlens_q`` on
  every replay. No host work per step, no copies.
* Plan outside the graph, persistent buffers (what sglang and vLLM do). The plan made for the largest
  captured batch owns one metadata buffer per key. Before capturing a smaller batch, and before every
  replay, call ``make_attention_plan(..., static_plan=captured)`` with the engine's static tensors (the
  captured plan's own tensors, or views at their front): fresh metadata is computed, copied into the front
  of the buffer, and the tail is zeroed (stale entries would let blocks of the split-KV combine write
  rows they do not own). Same batch size: the captured plan is refreshed in place and returned; a smaller
  batch: a new plan over the same buffers is returned, to capture with.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch
from attn_dispatch.checks import check_instance, check_scale, fail
from attn_dispatch.plans import AttentionParams, AttentionPlan
from attn_dispatch.reference.attention import packed_key_lengths
from attn_dispatch.validate import validate_make_attention_plan
from attn_dispatch_flash import FlashArgs, FlashProvider

from .stats import stats

FLASH_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class FlashPlan(AttentionPlan):
    """An :class:`AttentionPlan` made by this plugin.

    ``layer_params``: the distinct keys planned, in the order given. ``metadata[params]`` is FA3's scheduler
    metadata a layer with ``params`` hands the kernel (absent on the original path and with FA4, which
    schedule in the kernel); it is a view at the front of ``metadata_buffers[params]``, the persistent
    buffer (the same tensor unless the plan shares a larger static plan's buffers).
    """

    layer_params: tuple[AttentionParams, ...] = ()
    metadata: Mapping[AttentionParams, torch.Tensor] = field(default_factory=dict)
    metadata_buffers: Mapping[AttentionParams, torch.Tensor] = field(default_factory=dict)
    # What every layer's tensors must look like, precomputed for the per-call check (checks.fits_plan);
    # torch.Size, since a Size compares with a tensor's shape faster than a tuple does.
    q_tail: torch.Size = field(init=False, repr=False, compare=False)
    k_cache_tail: torch.Size = field(init=False, repr=False, compare=False)
    v_cache_tail: torch.Size = field(init=False, repr=False, compare=False)
    device_index: int = field(init=False, repr=False, compare=False)
    # Each layer's kernel call with this plan bound, by (ops, params, softmax_scale): made by the step's
    # first layer asking (ops.AttentionOutOps.paged_attention_out), looked up by the others.
    layer_calls: dict = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        # k and v: a paged plan's caches [pages, page_size, kv_heads, d], a packed plan's rows [keys, kv_heads, d]
        # (a padded plan's runs check their own 4D shapes: these tails serve paged_attention_out)
        pages = (self.page_size,) if self.page_table is not None else ()
        object.__setattr__(self, "q_tail", torch.Size((self.num_heads, self.head_dim)))
        object.__setattr__(self, "k_cache_tail", torch.Size((*pages, self.num_kv_heads, self.head_dim)))
        object.__setattr__(self, "v_cache_tail", torch.Size((*pages, self.num_kv_heads, self.head_dim_v)))
        object.__setattr__(self, "device_index", self.cache_seqlens.get_device())


def schedule_seqlen_k(provider: FlashProvider, plan: AttentionPlan) -> int:
    """The key length the provider's forward schedules for, hence the one its metadata is made for."""
    if provider.paged_seqlen_k_from_page_table and plan.page_table is not None:
        return plan.page_table.shape[1] * plan.page_size
    return plan.max_seqlen_k


def make_plan(provider: FlashProvider, *, original: bool, static_plan: AttentionPlan | None, **arguments) -> FlashPlan:
    """``make_attention_plan`` for ``provider``; ``original=True`` is the original path (no metadata).

    ``arguments``: the op's other arguments, all of them by name (``ops.AttentionOutOps`` passes them on),
    checked by the op's validator (FlashAttention's dtypes: fp16/bf16) before anything is made.
    """
    head_dim_v, distinct = validate_make_attention_plan(**arguments, static_plan=static_plan, dtypes=FLASH_DTYPES)
    if arguments["key_starts"] is not None and provider.fa_version != 3:
        fail("key_starts", f"{provider.name} (FA{provider.fa_version}) cannot read left-padded rows in place; make a packed plan")
    packed = arguments["cu_seqlens_k"] is not None
    if packed:  # FA3's metadata wants each sequence's key count
        arguments = {**arguments, "cache_seqlens": packed_key_lengths(arguments["cu_seqlens_k"])}
    plan = FlashPlan(**{**arguments, "head_dim_v": head_dim_v, "layer_params": distinct}, provider=provider.name)
    # Upstream FA3's varlen entry takes no metadata: its packed layers schedule themselves.
    makes_metadata = not original and provider.takes_metadata(packed=packed)
    if static_plan is not None:
        return _into_static_plan(provider, plan, static_plan, makes_metadata)
    if not makes_metadata:
        return plan
    metadata = {params: _scheduler_metadata(provider, plan, params) for params in distinct}
    # The plan was made here and nobody holds it yet: fill its metadata in place (a plan is made per step,
    # and dataclasses.replace would build and check it a second time).
    object.__setattr__(plan, "metadata", metadata)
    object.__setattr__(plan, "metadata_buffers", metadata)
    return plan


def _scheduler_metadata(provider: FlashProvider, plan: FlashPlan, params: AttentionParams) -> torch.Tensor:
    """One launch of FA3's ``prepare_varlen_num_blocks``, scheduled exactly as the layers' forwards will be."""
    stats.metadata_builds += 1
    return provider.scheduler_metadata(
        batch_size=plan.batch_size,
        max_seqlen_q=plan.max_seqlen_q,
        max_seqlen_k=schedule_seqlen_k(provider, plan),
        num_heads=plan.num_heads,
        num_kv_heads=plan.num_kv_heads,
        head_dim=plan.head_dim,
        head_dim_v=plan.head_dim_v,
        cache_seqlens=plan.cache_seqlens,
        cu_seqlens_q=plan.cu_seqlens_q,
        page_size=plan.page_size,
        dtype=plan.dtype,
        causal=params.causal,
        window_size=params.window_size,
        softcap=params.softcap,
        num_splits=params.num_splits,
        pack_gqa=params.pack_gqa,
        leftpad_k=plan.key_starts,
    )


def _with_metadata(plan: FlashPlan, metadata: Mapping, buffers: Mapping) -> FlashPlan:
    return replace(plan, metadata=dict(metadata), metadata_buffers=dict(buffers))


def _into_static_plan(provider: FlashProvider, plan: FlashPlan, static: AttentionPlan, makes_metadata: bool) -> FlashPlan:
    """Write ``plan``'s metadata into ``static``'s persistent buffers (front: fresh; tail: zeros)."""
    if not isinstance(static, FlashPlan) or static.provider != provider.name:
        fail("static_plan", f"must be a plan made by this plugin with provider {provider.name!r}, got {type(static).__name__} from {static.provider!r}")
    if static.page_table is None:
        fail("static_plan", "is a packed plan; static plans are paged")
    plan_shape = (plan.num_heads, plan.num_kv_heads, plan.head_dim, plan.head_dim_v, plan.dtype, plan.page_size)
    static_shape = (static.num_heads, static.num_kv_heads, static.head_dim, static.head_dim_v, static.dtype, static.page_size)
    if plan_shape != static_shape:
        fail("static_plan", f"was made for (heads, kv_heads, head_dim, head_dim_v, dtype, page_size) = {static_shape}, this batch has {plan_shape}")
    if set(plan.layer_params) != set(static.layer_params):
        fail("layer_params", f"{plan.layer_params} differ from the static plan's {static.layer_params}")
    if plan.batch_size > static.batch_size:
        fail("cache_seqlens", f"batch {plan.batch_size} exceeds the static plan's capacity {static.batch_size}")
    # The captured graph reads the static plan's tensors: this batch must live in them (front views).
    for name in ("cache_seqlens", "page_table", "cu_seqlens_q"):
        mine, theirs = getattr(plan, name), getattr(static, name)
        if mine.data_ptr() != theirs.data_ptr() or mine.stride() != theirs.stride():
            fail(name, "must be the static plan's tensor, or a view at its front: copy the new values into it")
    if plan.page_table.shape[1] != static.page_table.shape[1]:
        fail("page_table", f"has {plan.page_table.shape[1]} columns, the static plan {static.page_table.shape[1]}")

    in_place = plan.batch_size == static.batch_size
    if in_place:
        # A replay: the graph baked in the static plan's host ints, so the metadata is made for those.
        for name in ("max_seqlen_q", "max_seqlen_k"):
            if getattr(plan, name) > getattr(static, name):
                fail(name, f"{getattr(plan, name)} exceeds the captured plan's {getattr(static, name)}")
        plan = static
    stats.static_refreshes += 1
    if not makes_metadata:
        return plan

    views = {}
    for params in plan.layer_params:
        fresh = _scheduler_metadata(provider, plan, params)
        buffer = static.metadata_buffers[params]
        used = fresh.numel()
        if used > buffer.numel():
            fail("static_plan", f"metadata for {params} needs {used} entries, its buffer holds {buffer.numel()}")
        buffer[:used].copy_(fresh)
        if used < buffer.numel():
            buffer[used:].zero_()
        views[params] = buffer[:used]
    if in_place:
        return static  # its metadata views already cover exactly these entries (same batch size)
    return _with_metadata(plan, views, buffers=static.metadata_buffers)


def check_plan_is_ours(plan: object, provider_name: str) -> None:
    """ValueError naming ``plan`` unless this plugin made it for ``provider_name``."""
    check_instance("plan", plan, AttentionPlan, " from make_attention_plan")
    if not isinstance(plan, FlashPlan) or plan.provider != provider_name:
        maker = getattr(plan, "provider", type(plan).__name__)
        fail("plan", f"was made by {maker!r}, not by this plugin's make_attention_plan ({provider_name})")


def paged_args(plan: FlashPlan, params: AttentionParams, softmax_scale: float | None, provider_name: str) -> FlashArgs:
    """The kernel arguments of a paged layer with ``params`` over ``plan`` (see :func:`plan_args`);
    ValueError, naming ``plan``, for a packed plan."""
    if isinstance(plan, AttentionPlan) and plan.page_table is None:
        fail("plan", f"is a {plan.kind} plan (made without a page table): run it through bind_attention")
    return plan_args(plan, params, softmax_scale, provider_name)


def plan_args(plan: FlashPlan, params: AttentionParams, softmax_scale: float | None, provider_name: str) -> FlashArgs:
    """The kernel arguments of a layer with ``params`` over ``plan``: the plan's tensors and ints, the
    params' scheduling, the metadata made for exactly those. ValueError when the plan is another's or
    ``params`` was not planned (a layer handed another key's metadata would be misscheduled silently).
    A packed plan's keys are addressed by ``cu_seqlens_k`` (as ``varlen_attention_out``'s call, plus the
    metadata), a paged plan's by the page table and ``seqused_k``, a padded plan's by ``leftpad_k`` (starts)
    and ``seqused_k`` (ends) in FA3's batch mode."""
    check_plan_is_ours(plan, provider_name)
    check_instance("params", params, AttentionParams)
    check_scale(softmax_scale)
    if params not in plan.layer_params:
        fail("params", f"{params} is not among the plan's layer_params {plan.layer_params}; list it in make_attention_plan(layer_params=...)")
    packed = plan.cu_seqlens_k is not None
    return FlashArgs(
        cu_seqlens_q=plan.cu_seqlens_q, cu_seqlens_k=plan.cu_seqlens_k, leftpad_k=plan.key_starts,
        seqused_k=None if packed else plan.cache_seqlens, page_table=plan.page_table,
        max_seqlen_q=plan.max_seqlen_q, max_seqlen_k=plan.max_seqlen_k,
        softmax_scale=plan.head_dim**-0.5 if softmax_scale is None else softmax_scale, causal=params.causal,
        window_size=params.window_size, softcap=params.softcap, scheduler_metadata=plan.metadata.get(params),
        num_splits=params.num_splits, pack_gqa=params.pack_gqa,
    )  # fmt: skip

