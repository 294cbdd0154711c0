"""``paged|attn_dispatch``: transformers 5.17's continuous batching (``model.generate_batch``, the paged KV
cache) through ``make_attention_plan`` and ``bind_attention`` once per batch step and the bound run per layer.

Registered by ``attn_dispatch.integrations.transformers`` (importing it registers both names). Select it with
``from_pretrained(..., attn_implementation="paged|attn_dispatch")`` or ``set_attn_implementation``.

What transformers 5.17 hands a ``paged|*`` attention per layer: ``q`` ``[1, H, T, D]`` and the step's new
``k``/``v`` ``[1, H_kv, T, D]`` (T: every query token of the step, packed, maybe padded); ``cache`` (the
``PagedAttentionCache``); ``cu_seq_lens_q`` int32 ``[B + 1]``; ``cu_seq_lens_k`` and ``max_seqlen_k`` (a
tensor/int, or dicts by layer type ``full_attention``/``sliding_attention``); ``max_seqlen_q``;
``write_index``/``read_index`` (one int64 tensor per layer group: the cache slots the new tokens go to, and
the slots of every key each sequence reads, new ones included, concatenated in ``cu_seq_lens_k`` order;
``read_index`` is empty when no request has a past); ``block_table`` (None: the decode fast path is only
enabled for FlashAttention names); ``attention_mask`` None (continuous batching builds masks only for
``paged|sdpa``/``paged|eager``).

The mapping. A layer's cache ``cache.key_cache[j]`` (j: its index in its layer group) is
``[(num_blocks + 2) * block_size, H_kv, D]``; its view ``[num_blocks + 2, block_size, H_kv, D]`` is
``paged_attention_out``'s ``[pages, page_size, kv_heads, head_dim]`` (page = block, the last two blocks being
transformers' read/write trash). A full-attention group stores position ``p`` of a sequence at slot
``block_table[p // block_size] * block_size + p % block_size``, so its slots for one sequence are its read
indices, and page ``i`` of sequence ``b`` is ``slot(cu_seq_lens_k[b] + i * block_size) // block_size``
(write indices when nothing is read: then every key is new and starts at position 0). From that, on the
device (no host sync): ``page_table`` ``[B, ceil(max_seqlen_k / block_size)]`` (unused columns: any valid
page), ``cache_seqlens = diff(cu_seq_lens_k)``, ``cu_seqlens_q = cu_seq_lens_q``, and the plan is made at
the step's first layer (per layer group and distinct params) and reused by its other layers. Each layer
writes its new k/v into the slots ``write_index`` names (as ``cache.update`` does), then calls the step's run (``bind_attention``: paged
attention, bottom-right causal, ``softcap``) into one output buffer per step. The step is
recognised by its first layer (a layer index at or below the last one seen), or by new ``cu_seq_lens_q`` /
``write_index`` objects (held, so never reused) or a new version of ``cu_seq_lens_q``.

Not exact, so ``paged|sdpa`` runs with exactly the arguments it would have got (the mask, which continuous
batching does not build for this name, is rebuilt on the device as its ``build_attention_mask`` makes it,
once per step and layer type): sliding-window layers (their group is a ring buffer of ``sliding_window``
slots, written after it is read, with sentinel slots for new keys: not pages in order), anything but
fp16/bf16, head dims not a multiple of 8 or above 256, attention sinks (``s_aux``), dropout,
``output_attentions``, autograd, torch.compile tracing, a block table, and devices whose op group is the
reference. ``paged|sdpa`` ignores ``softcap`` (the fast path applies it, as eager does).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch

from ..plans import AttentionParams
from .transformers_meta import version_of

try:
    from transformers.integrations.sdpa_paged import sdpa_attention_paged_forward
except ImportError:  # a transformers without continuous batching: register() says so
    sdpa_attention_paged_forward = None

NAME = "paged|attn_dispatch"
MAX_HEAD_DIM = 256


@dataclass
class Stats:
    """Counters for tests: ``plans`` made, ``fast`` layer calls through the plan's bound run,
    ``fallback`` layer calls through ``paged|sdpa``."""

    plans: int = 0
    fast: int = 0
    fallback: int = 0


stats = Stats()


@dataclass
class _Step:
    """One batch step's state, shared by its layers. Holds the step's tensors, so their ids stay unique."""

    cu_seq_lens_q: torch.Tensor
    write_index: list
    version: int | None
    last_layer: int = -1  # the newest layer index seen in this step
    plans: dict = field(default_factory=dict)  # (group, params) -> plan
    runs: dict = field(default_factory=dict)  # (group, params, scale) -> bind_attention's run over that plan
    outs: dict = field(default_factory=dict)  # (tokens, heads, head_dim, dtype) -> [tokens, heads, head_dim]
    masks: dict = field(default_factory=dict)  # (layer type, kv length) -> the mask paged|sdpa would get


_step: _Step | None = None


def _current_step(kwargs: dict, layer_idx: int) -> _Step:
    """The step this layer call belongs to. A layer index at or below the last one seen starts a new step
    (layers run in order, once per forward), whatever the tensors: continuous batching may hand a later
    step the same input tensors refilled in place, which under inference mode have no version counter."""
    global _step
    cu, write_index = kwargs["cu_seq_lens_q"], kwargs["write_index"]
    step = _step
    if (
        step is None
        or layer_idx <= step.last_layer
        or step.cu_seq_lens_q is not cu
        or step.write_index is not write_index
        or step.version != version_of(cu)
    ):
        step = _step = _Step(cu, write_index, version_of(cu))
    step.last_layer = layer_idx
    return step


def attention(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, **kwargs: Any,
) -> tuple[torch.Tensor, None]:  # fmt: skip
    """``paged|attn_dispatch``: q ``[1, H, T, D]``, k/v ``[1, H_kv, T, D]``; returns (``[1, T, H, D]``, None)."""
    cache = kwargs.get("cache")
    if cache is None:
        raise ValueError(f"`{NAME}` was called without a paged attention cache: it serves continuous batching only")
    step = _current_step(kwargs, module.layer_idx)
    ops = _fast_ops(module, query, key, value, cache, kwargs)
    if ops is None:
        stats.fallback += 1
        if attention_mask is None:
            attention_mask = _sdpa_mask(step, module, query, cache, kwargs)
        return sdpa_attention_paged_forward(module, query, key, value, attention_mask, **kwargs)
    stats.fast += 1
    group, in_group = cache.layer_index_to_group_indices[module.layer_idx]
    k_cache, v_cache = cache.key_cache[in_group], cache.value_cache[in_group]
    write = kwargs["write_index"][group]
    k_cache.index_copy_(0, write, key[0].transpose(0, 1))  # cache.update's write, without its read-back
    v_cache.index_copy_(0, write, value[0].transpose(0, 1))
    params = _params(float(kwargs.get("softcap") or 0.0))
    scale = kwargs.get("scaling", getattr(module, "scaling", None))
    run = step.runs.get((group, params, scale))
    if run is None:
        plan = step.plans.get((group, params))
        if plan is None:
            plan = step.plans[(group, params)] = _make_plan(ops, query, key, cache, group, params, kwargs)
        run = step.runs[(group, params, scale)] = ops.bind_attention(plan, params=params, softmax_scale=scale)
    _, heads, tokens, head_dim = query.shape
    out_key = (tokens, heads, head_dim, query.dtype)
    out = step.outs.get(out_key)
    if out is None:
        out = step.outs[out_key] = query.new_empty(tokens, heads, head_dim)
    pages = k_cache.view(-1, cache.block_size, *k_cache.shape[1:])
    run(query[0].transpose(0, 1), pages, v_cache.view(pages.shape), out)
    return out.unsqueeze(0), None


@functools.cache
def _params(softcap: float) -> AttentionParams:
    """Causal params with ``softcap``, made once per value (every layer of every step asks)."""
    return AttentionParams(causal=True, softcap=softcap)


def _by_type(value: Any, layer_type: str) -> Any:
    return value[layer_type] if isinstance(value, dict) else value


def _make_plan(ops, query, key, cache, group: int, params: AttentionParams, kwargs: dict):
    """The step's plan for one full-attention layer group (see the module doc for the mapping)."""
    stats.plans += 1
    cu_k = _by_type(kwargs["cu_seq_lens_k"], "full_attention").to(torch.int32)
    max_k = int(_by_type(kwargs["max_seqlen_k"], "full_attention"))
    read = kwargs["read_index"][group]
    slots = read if read.numel() else kwargs["write_index"][group]
    size = cache.block_size
    width = max(1, -(-max_k // size))
    first = cu_k[:-1, None].long() + torch.arange(width, device=cu_k.device) * size
    page_table = (slots[first.clamp_(0, max(slots.numel() - 1, 0))] // size).to(torch.int32)
    return ops.make_attention_plan(
        cache_seqlens=(cu_k[1:] - cu_k[:-1]).contiguous(), page_table=page_table,
        cu_seqlens_q=kwargs["cu_seq_lens_q"].to(torch.int32).contiguous(), max_seqlen_q=int(kwargs["max_seqlen_q"]),
        max_seqlen_k=max_k, page_size=size, num_heads=query.shape[1], num_kv_heads=key.shape[1],
        head_dim=query.shape[3], dtype=query.dtype, layer_params=(params,),
    )  # fmt: skip


def _fast_ops(module, query, key, value, cache, kwargs) -> Any | None:
    """The op group when this layer call is one ``paged_attention_out`` computes exactly, else None."""
    if kwargs.get("output_attentions") or kwargs.get("dropout", 0.0) or "s_aux" in kwargs:
        return None
    if kwargs.get("block_table") is not None or cache.sliding_windows.get(module.layer_idx, 1) != 1:
        return None
    if getattr(module, "sliding_window", None) or not getattr(module, "is_causal", True):
        return None
    dtype = query.dtype
    if dtype not in (torch.float16, torch.bfloat16) or key.dtype != dtype or value.dtype != dtype:
        return None
    if cache.dtype != dtype or query.dim() != 4 or query.shape[0] != 1 or key.shape[:3] != value.shape[:3]:
        return None
    head_dim = query.shape[3]
    if (key.shape[3], value.shape[3], cache.head_dim) != (head_dim,) * 3 or head_dim % 8 or head_dim > MAX_HEAD_DIM:
        return None
    if query.shape[1] % key.shape[1] or key.shape[1] != cache.num_key_value_heads:
        return None
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return None
    if torch.compiler.is_compiling():  # the step cache is Python state: a traced graph takes paged|sdpa
        return None
    from .transformers import ops_for  # the same op group (and use_ops seam) as "attn_dispatch"

    return ops_for(query.device)


def _sdpa_mask(step: _Step, module, query, cache, kwargs) -> torch.Tensor:
    """The 4D float mask continuous batching builds for ``paged|sdpa`` (``build_attention_mask`` into a buffer
    of ``finfo.min``, sliced ``[..., :T, :K]``), made on the device once per step and layer type."""
    window = cache.sliding_windows.get(module.layer_idx, 1)
    layer_type = "sliding_attention" if window > 1 else "full_attention"
    group = cache.layer_index_to_group_indices[module.layer_idx][0]
    tokens = query.shape[2]
    read = kwargs["read_index"][group]
    kv_length = read.numel() or tokens  # what cache.update returns, and the mask's width
    mask = step.masks.get((layer_type, kv_length))
    if mask is None:
        cu_q = kwargs["cu_seq_lens_q"].long()
        cu_k = _by_type(kwargs["cu_seq_lens_k"], layer_type).long()
        seq_q, pos_q, len_q = _segments(cu_q, tokens)
        seq_k, pos_k, _ = _segments(cu_k, kv_length)
        valid_q = torch.arange(tokens, device=cu_q.device) < cu_q[-1]
        valid_k = torch.arange(kv_length, device=cu_k.device) < cu_k[-1]
        len_k = (cu_k[1:] - cu_k[:-1])[seq_q]  # per query row: its sequence's key count
        rel = pos_k[None, :] - pos_q[:, None]
        offset = (len_k - len_q)[:, None]  # build_attention_mask's causal diagonal is offset + 1 when len_q < len_k
        causal = torch.where(((len_q < len_k) & (len_q >= 1))[:, None], offset, 0)
        allowed = (seq_q[:, None] == seq_k[None, :]) & valid_q[:, None] & valid_k[None, :] & (rel <= causal)
        if window > 1:
            allowed &= rel > offset - window
        zero = torch.zeros((), dtype=cache.dtype, device=query.device)
        low = torch.full((), torch.finfo(cache.dtype).min, dtype=cache.dtype, device=query.device)
        mask = step.masks[(layer_type, kv_length)] = torch.where(allowed, zero, low)[None, None]
    return mask


def _segments(cu: torch.Tensor, length: int):
    """Per packed row: its sequence, its position in it, and that sequence's length (device ops only)."""
    rows = torch.arange(length, device=cu.device)
    seq = torch.searchsorted(cu[1:], rows, right=True).clamp_(max=cu.shape[0] - 2)
    return seq, rows - cu[seq], (cu[1:] - cu[:-1])[seq]


def register(interface: Any) -> str:
    """Register :func:`attention` as :data:`NAME` in ``interface`` (transformers' ``AttentionInterface``);
    the caller has checked the version series. Raises the integration's ``UnsupportedTransformersVersion``
    on a transformers without continuous batching's paged attention hook."""
    from .transformers import UnsupportedTransformersVersion

    if sdpa_attention_paged_forward is None:
        raise UnsupportedTransformersVersion(
            f"{NAME} needs transformers' continuous batching (transformers.integrations.sdpa_paged, "
            "PagedAttentionCache), which this transformers lacks: install transformers 5.17.x"
        )
    interface.register(NAME, attention)
    return NAME
