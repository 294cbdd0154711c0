"""``attn_dispatch_varlen_diffusion::masked_attention``: the fast path as one custom op, for torch.compile.

Under ``torch.compile`` the plugin's ``masked_attention`` checks its inputs while Dynamo traces (all
host checks are on shapes, dtypes and devices, so they trace without a graph break) and then calls this
op. The op's inputs are q/k/v, the metadata's tensors whose shapes are fixed by the mask's ``[B, S_k]``
(``key_mask``, ``seqlens``, both ``cu_seqlens``, ``inverse``, and ``kv_pack``'s ``[B * S_k]`` ``indices``)
and its strategy flags. Nothing that varies between masks of one strategy goes in as a host value: not
``total`` (Dynamo would guard on the int), not the layout (prefix or window: the bound call never reads
it), and not ``qkv_pack``'s ``indices`` or ``masked`` (their lengths would be guarded, then made dynamic
by a recompile). So one graph compiled for a mask runs every later mask of the same ``[B, S_k]`` and
strategy, whatever its valid count (``test_compile``). The fake implementation gives the output's shape:
``[B, S_q, H, D_v]``, contiguous, a new tensor (no aliasing, nothing mutated).

Inside, the op finds the metadata object again by the identity of its tensors alone (Inductor passes
graph inputs through unchanged) and reuses its bound calls. If it cannot (its tensors were copied on the
way, as CUDA graph trees copy graph inputs):

- ``kv_pack`` and ``zero_copy``: no host value of their bound calls depends on the mask's contents (the
  K/V gather covers all ``B * S_k`` rows; FlashAttention reads the counts on the device), so the op makes
  the metadata from the copies alone (:func:`_from_tensors`): no sync, nothing stale. These strategies run
  **inside** CUDA graphs (``torch.compile(mode="reduce-overhead")``): a graph captured for one mask
  replays right for every mask of that shape that cudagraph trees copy in.
- ``qkv_pack``: its bound calls bake the valid count (packed Q, the masked rows' list), so it is a second
  op, ``masked_attention_counts``, tagged ``cudagraph_unsafe``: Inductor's graph partitioning runs it
  eagerly between the captured partitions, with the real metadata. Outside a capture it rebuilds its
  metadata from the key mask (correct; syncs). Should it still be reached inside a capture with copies,
  it runs the original path (SDPA with the key mask, which reads the mask on the device at replay)
  instead of rebuilding: correct, never a crash.

The ops object is passed as an index into :data:`_OPS` (a custom op takes no Python objects), as
cuda_fa3 passes its provider. The ops are registered directly (``attn_dispatch.direct_op``), not through
``torch.library.custom_op``, whose wrapper costs several us per call.
"""

from __future__ import annotations

import logging
import weakref
from typing import Optional

import torch
from attn_dispatch import direct_op
from attn_dispatch.plans import MaskMeta
from attn_dispatch.reference import masked as original

from .binding import bind_call, call_key
from .meta import Strategy, VarlenMaskMeta, classify

NAMESPACE = "attn_dispatch_varlen_diffusion"
_OPS: list = []  # VarlenDiffusionAttention objects, by index
_METAS: dict[int, weakref.ref] = {}  # id(meta.cu_seqlens_k) -> the metadata that owns it
_REBUILT: dict[tuple, tuple[list, VarlenMaskMeta]] = {}
_STRATEGIES = list(Strategy)  # the op's int codes for them, by position
_WARNED: list = []  # the capture fallback's warning, once per process
log = logging.getLogger("attn_dispatch")


def ops_index(ops: object) -> int:
    """The index that names ``ops`` to the custom op (registered on first use)."""
    for index, known in enumerate(_OPS):
        if known is ops:
            return index
    _OPS.append(ops)
    return len(_OPS) - 1


def remember(meta: VarlenMaskMeta) -> None:
    """Let the op find ``meta`` (and its bound calls) from its tensors; called by ``build_mask_meta``."""
    _METAS[id(meta.cu_seqlens_k)] = weakref.ref(meta)
    if len(_METAS) > 1024:  # drop the dead entries now and then
        for key in [key for key, ref in _METAS.items() if ref() is None]:
            del _METAS[key]


def call(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: VarlenMaskMeta, scale: float) -> torch.Tensor:
    """What ``masked_attention`` calls while compiling: the strategy's op with the metadata spelled out
    (``index``: the ops object's :func:`ops_index`). Reads no attribute sized by the valid count (module doc)."""
    return op_for(meta.strategy)(
        q, k, v, *_tensors_of(meta), _STRATEGIES.index(meta.strategy), meta.zero_masked_queries, meta.pack_queries,
        scale, index,
    )  # fmt: skip


def op_for(strategy: Strategy) -> torch._ops.OpOverload:
    """The op for ``strategy``: ``masked_attention_counts`` (left out of CUDA graphs) for ``qkv_pack``."""
    return masked_attention_counts if strategy is Strategy.QKV_PACK else masked_attention


# typing.Optional, not `X | None`: the schema is inferred from these annotations.
def _masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor,
    seqlens: torch.Tensor,
    cu_seqlens_padded: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    inverse: Optional[torch.Tensor],
    indices: Optional[torch.Tensor],
    strategy: int,
    zero_masked_queries: bool,
    pack_queries: bool,
    softmax_scale: float,
    ops: int,
) -> torch.Tensor:
    """The plugin's fast path for inputs already checked by ``masked_attention`` (see the module doc)."""
    tensors = (key_mask, seqlens, cu_seqlens_padded, cu_seqlens_k, inverse, indices)
    meta = _find(tensors, (strategy, zero_masked_queries, pack_queries))
    if meta is None:  # qkv_pack with copies of its metadata's tensors inside a CUDA graph capture (module doc)
        return _captured_original(q, k, v, key_mask, zero_masked_queries, softmax_scale)
    owner = _OPS[ops]
    key = call_key(owner, q, k, v, softmax_scale)
    bound = meta.calls.get(key)
    if bound is None:
        bound = bind_call(owner.provider, meta, q, k, v, softmax_scale, key_pages=owner.key_pages)
        if not _capturing(q):  # bound inside a capture: its tensors (b * S_q) are filled only by replays
            meta.calls[key] = bound
    return bound(q, k, v)


def _masked_attention_fake(q, k, v, *args) -> torch.Tensor:
    return q.new_empty((*q.shape[:3], v.shape[-1]))


masked_attention = direct_op.register(f"{NAMESPACE}::masked_attention", _masked_attention, fake=_masked_attention_fake)
masked_attention_counts = direct_op.register(
    f"{NAMESPACE}::masked_attention_counts", _masked_attention, fake=_masked_attention_fake, cudagraph_unsafe=True
)


def _find(tensors: tuple, scalars: tuple) -> VarlenMaskMeta | None:
    """The metadata these tensors came from (matched on tensor identity only), else an equivalent one:
    made from the tensors alone (``kv_pack``, ``zero_copy``) or rebuilt from the key mask (``qkv_pack``),
    cached while its tensors live. Inside a CUDA graph capture nothing is cached, and ``qkv_pack`` gets
    None instead of a rebuilt metadata: rebuilding would sync, and a replay may see other mask contents."""
    key_mask, cu_k = tensors[0], tensors[3]
    ref = _METAS.get(id(cu_k))
    meta = ref() if ref is not None else None
    if meta is not None and all(a is b for a, b in zip(_tensors_of(meta), tensors)):
        return meta
    counted = _STRATEGIES[scalars[0]] is Strategy.QKV_PACK
    if _capturing(key_mask):
        return None if counted else _from_tensors(tensors, scalars)
    key = (*map(id, tensors), *scalars)
    hit = _REBUILT.get(key)
    if hit is not None and all(r() is t for r, t in zip(hit[0], tensors) if r is not None):
        return hit[1]
    meta = _rebuild(tensors, scalars) if counted else _from_tensors(tensors, scalars)
    if len(_REBUILT) > 64:
        _REBUILT.clear()
    _REBUILT[key] = ([weakref.ref(t) if t is not None else None for t in tensors], meta)
    return meta


def _capturing(key_mask: torch.Tensor) -> bool:
    return key_mask.is_cuda and torch.cuda.is_current_stream_capturing()


def _captured_original(q, k, v, key_mask, zero_masked_queries: bool, scale: float) -> torch.Tensor:
    """The op's contract through the original path, with no host sync: SDPA with the key mask; zeros for
    a batch row with no valid key and, under the zeroing contract (self-attention), for masked query rows."""
    if not _WARNED:
        _WARNED.append(True)
        log.warning(
            "attn_dispatch_varlen_diffusion::masked_attention_counts (the qkv_pack strategy) was captured into a "
            "CUDA graph with copies of its mask metadata: it runs SDPA with the mask there (correct, without the "
            "fast path's speed); kv_pack, the default, runs its fast path inside CUDA graphs"
        )
    out = original.masked_attention(q, k, v, MaskMeta(key_mask=key_mask), softmax_scale=scale)
    keep = key_mask.any(dim=1)[:, None, None, None]  # [B, 1, 1, 1]
    if zero_masked_queries and q.shape[1] == k.shape[1]:
        keep = keep & key_mask[:, :, None, None]
    return torch.where(keep, out, out.new_zeros(())).contiguous()


def _from_tensors(tensors: tuple, scalars: tuple) -> VarlenMaskMeta:
    """``kv_pack``'s or ``zero_copy``'s metadata from its tensors alone: their bound calls read nothing
    else, so no sync; ``layout`` and ``total`` stay None (not known on the host)."""
    key_mask, seqlens, cu_padded, cu_k, inverse, indices = tensors
    strategy, zero_masked_queries, pack_queries = scalars
    return VarlenMaskMeta(
        key_mask=key_mask, layout=None, strategy=_STRATEGIES[strategy], zero_masked_queries=zero_masked_queries,
        batch=key_mask.shape[0], seqlen=key_mask.shape[1], total=None, seqlens=seqlens, cu_seqlens_padded=cu_padded,
        cu_seqlens_k=cu_k, indices=indices, pack_queries=pack_queries, inverse=inverse,
    )  # fmt: skip


def _rebuild(tensors: tuple, scalars: tuple) -> VarlenMaskMeta:
    """A ``qkv_pack`` metadata equal to the one ``tensors`` came from: layout, count and index lists
    recomputed from the key mask (same values as ``meta.make_mask_meta``'s; syncs, which only this slow
    path pays)."""
    key_mask, seqlens, cu_padded, cu_k, inverse, _ = tensors
    strategy, zero_masked_queries, pack_queries = scalars
    layout, total, _, _ = classify(key_mask)
    flat_mask = key_mask.reshape(-1)
    indices = flat_mask.nonzero().squeeze(1).to(torch.int32)
    masked = None if pack_queries else (~flat_mask).nonzero().squeeze(1)  # int64, as make_mask_meta's
    return VarlenMaskMeta(
        key_mask=key_mask, layout=layout, strategy=_STRATEGIES[strategy], zero_masked_queries=zero_masked_queries,
        batch=key_mask.shape[0], seqlen=key_mask.shape[1], total=total, seqlens=seqlens, cu_seqlens_padded=cu_padded,
        cu_seqlens_k=cu_k, indices=indices, pack_queries=pack_queries, inverse=inverse, masked=masked,
    )  # fmt: skip


def _tensors_of(meta: VarlenMaskMeta) -> tuple:
    """The op's tensor arguments: those whose shapes the mask's ``[B, S_k]`` fixes (``indices`` only
    under ``kv_pack``, where it is ``[B * S_k]``)."""
    indices = meta.indices if meta.strategy is Strategy.KV_PACK else None
    return (meta.key_mask, meta.seqlens, meta.cu_seqlens_padded, meta.cu_seqlens_k, meta.inverse, indices)
