"""Key-padding-masked attention for diffusion models as varlen FlashAttention.

Same operations and signatures as the original path (``attn_dispatch.reference.masked``)::

    meta = ops.build_mask_meta(key_mask)                     # once per request: [B, S_k] bool/int mask
    out = ops.masked_attention(q, k, v, meta, softmax_scale=None)   # per block: q [B, S_q, H, D],
                                                             # k/v [B, S_k, H_kv, D] -> [B, S_q, H, D]

Self-attention has ``S_q == S_k`` (a query row's own mask bit says whether it is "valid"). Cross-attention
(``S_q != S_k``, e.g. image queries over padded text keys) uses the same metadata, built from the key
mask alone: Q stays padded (``cu_seqlens_q = b * S_q``, ``max_seqlen_q = S_q``) and every query row is
valid, under every strategy. GQA (``H_kv`` divides ``H``) goes to FlashAttention as is.

``build_mask_meta`` picks a strategy from the mask's layout (see ``meta``):

- ``zero_copy`` (prefix or window layouts): Q/K/V stay in ``[B, S, H, D]``; FlashAttention reads each
  row's keys in place through ``cu_seqlens_k = b * S + run start`` and ``seqused_k``. Queries use the
  padded ``cu_seqlens_q = b * S``, so every query row is computed.
- ``kv_pack`` (general layouts, the default): one fused Triton kernel gathers the valid K and V rows;
  Q and the output stay padded (``cu_seqlens_q = b * S``, packed ``cu_seqlens_k``).
- ``qkv_pack`` (opt-in: ``ATTN_DISPATCH_VARLEN_DIFFUSION_STRATEGY=qkv_pack``, the seed PR's contract):
  masked query rows are dropped and come out as zeros. When dropping them saves more attention time than
  moving Q and the output costs (``meta.packing_queries_pays``: masked share x mean valid keys > 280), one
  kernel gathers valid Q, K and V rows, FlashAttention runs on the packed tokens, and one kernel scatters
  them back, writing zeros in masked rows. Otherwise (few masked rows: Q packing would cost more than it
  saves) it runs as ``kv_pack`` and zeroes the masked rows of the output in place. It also sets the
  zeroing contract for prefix and window layouts, which then stay zero-copy and pass ``seqused_q`` into
  a zeroed output (or use ``qkv_pack`` where the provider has no ``seqused_q`` or cannot write into
  ``out``).

What comes back, row by row ("valid" = the token's own key-mask bit is True):

- Valid query rows: SDPA with the boolean key mask, to FlashAttention tolerance (bf16: rtol 1e-2,
  atol 5e-2). ``zero_copy`` and ``kv_pack`` run the same kernel on the same keys: bit-equal.
- Masked query rows: default: exactly what SDPA computes for them (attention over the row's valid
  keys; SDPA masks keys only). Under ``qkv_pack``: zeros, in every layout.
- Every query row of a batch element with no valid key: zeros (FlashAttention's empty-softmax output),
  in every strategy. SDPA's answer there depends on backend and version (NaN on some; zeros on torch
  2.13's CPU kernels); the fallback below returns whatever SDPA returns.
- Left padding, gaps, any mix of layouts across the batch: covered by the rules above.
- Cross-attention: every query row is valid (SDPA's rows); a batch element with no valid key: zeros.

Fallback (the original SDPA path, called as is, so byte-identical): float (additive) masks, for which
``build_mask_meta`` returns the original plain ``MaskMeta``; k and v of different shapes (a value head
dim other than the key's, say), a batch other than q's, or K/V heads that do not divide Q's; dtypes
other than fp16/bf16; a head dim FlashAttention does not
take (not a multiple of 8, or over 256); tensors not on the provider's device type; a ``MaskMeta`` this
plugin did not make. Errors: a mask on another device than ``q`` raises ``ValueError`` naming
``mask_meta`` (as the original path does), so does a mask whose ``[B, S_k]`` differs from k's.

Host path (eager): the first call with a metadata object and a call shape lays the call out once
(``binding.bind_call``: route, FlashAttention arguments, pack kernels bound to their compiled launcher)
and caches it on the metadata under ``binding.call_key``; every later block runs that closure after one
dict lookup. Under ``torch.compile`` the checks trace and the work is one custom op
(``custom_ops``), so attention causes no graph break.

Syncs: ``build_mask_meta``: one device-to-host copy of three ints per request. ``masked_attention``:
none; it allocates, launches and returns, so it can be captured in a CUDA graph (sizes come from the
metadata; the max-seqlen bounds are the padded S_q and S_k). Under ``kv_pack`` and ``zero_copy`` the
launches' sizes depend on the shapes alone, so a graph captured for one mask is right for another mask
of that shape and strategy once its metadata's tensors are copied into the captured ones (what
``torch.compile(mode="reduce-overhead")`` does; ``custom_ops``). Make the first call for a new call shape
before capturing (as any warm-up does): binding compiles the pack kernel. A call bound during a capture
is not cached (cross-attention's ``b * S_q`` offsets made there hold values only after a replay).
"""

from __future__ import annotations

import logging
import os

import torch

from attn_dispatch_flash import FlashProvider
from attn_dispatch.plans import MaskMeta
from attn_dispatch.reference import masked as original
from attn_dispatch.validate import validate_masked_attention

from . import custom_ops
from .binding import bind_call, call_key
from .meta import Strategy, VarlenMaskMeta, make_mask_meta

log = logging.getLogger("attn_dispatch")

STRATEGY_ENV = "ATTN_DISPATCH_VARLEN_DIFFUSION_STRATEGY"
GENERAL_STRATEGIES = (Strategy.KV_PACK, Strategy.QKV_PACK)
FLASH_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


def strategy_from_env() -> Strategy:
    """The general-mask strategy from ``ATTN_DISPATCH_VARLEN_DIFFUSION_STRATEGY`` (default ``kv_pack``).

    Read by the host's settings model (the plugin's declared ``STRATEGY``): an unreadable value is warned
    about and the default used. Only for direct ``build_ops`` calls; ``load()`` passes the parsed setting.
    """
    from attn_dispatch import settings

    from . import STRATEGY

    value = settings.read(STRATEGY, STRATEGY_ENV, os.environ)
    if value.problem:
        log.warning("%s", value.problem)
    return Strategy(value.value)


class VarlenDiffusionAttention:
    """The ``masked_attention`` op group over one :class:`FlashProvider`; build with :func:`build_ops`."""

    def __init__(
        self,
        provider: FlashProvider,
        *,
        general_strategy: Strategy,
        zero_copy: bool = True,
        device_type: str = "cuda",
        pack_queries: bool | None = None,
        key_pages: bool = False,
    ) -> None:
        if general_strategy not in GENERAL_STRATEGIES:
            raise ValueError(f"general_strategy: expected kv_pack or qkv_pack, got {general_strategy!r}")
        self.provider = provider
        self.general_strategy = Strategy(general_strategy)
        self.zero_copy = zero_copy
        self.device_type = device_type
        self.pack_queries = pack_queries
        self.key_pages = key_pages
        # Zero-copy under the zeroing contract leaves masked query rows to a zeroed `out`.
        self._zero_copy_skips_queries = provider.has_seqused_q and provider.writes_out
        self._op_index = custom_ops.ops_index(self)  # how the compiled path's custom op names this object

    def describe(self) -> str:
        return f"{self.provider.describe()}; general masks: {self.general_strategy.value}"

    def build_mask_meta(self, key_mask: torch.Tensor) -> MaskMeta:
        """``key_mask`` ``[B, S]``: bool or int (nonzero = attend) -> :class:`VarlenMaskMeta`; float -> the
        original ``MaskMeta`` (additive masks run on SDPA). Once per request; one host sync (see module doc).
        """
        base = original.build_mask_meta(key_mask)  # same checks and int -> bool conversion as the original
        mask = base.key_mask
        if mask.dtype != torch.bool or mask.numel() == 0:
            return base
        meta = make_mask_meta(
            mask, general_strategy=self.general_strategy, zero_copy=self.zero_copy,
            zero_copy_skips_queries=self._zero_copy_skips_queries, pack_queries=self.pack_queries,
            key_pages=self.key_pages,
        )  # fmt: skip
        custom_ops.remember(meta)
        return meta

    def masked_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask_meta: MaskMeta,
        *,
        softmax_scale: float | None = None,
    ) -> torch.Tensor:
        """``q`` ``[B, S_q, H, D]``, ``k``/``v`` ``[B, S_k, H_kv, D]`` -> contiguous ``[B, S_q, H, D]``;
        contract in the module docstring. Eager: a call bound for this metadata and these shapes runs
        (``binding``); compiling: the custom op ``attn_dispatch_varlen_diffusion::masked_attention``."""
        compiling = torch.compiler.is_compiling()
        calls = None if compiling else getattr(mask_meta, "calls", None)
        if calls is not None:  # the per-block path: one dict lookup, then the bound call
            key = call_key(self, q, k, v, softmax_scale)
            bound = calls.get(key)
            if bound is not None:
                return bound(q, k, v)
        if not isinstance(mask_meta, VarlenMaskMeta) or not self._flash_can_run(q, k, v):
            return original.masked_attention(q, k, v, mask_meta, softmax_scale=softmax_scale)
        meta = mask_meta
        # The op's full rule set, once per (metadata, call shape): a bound call is reused only for inputs
        # that agree with these in everything the rules read (binding.call_key).
        validate_masked_attention(q, k, v, meta, softmax_scale)
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
        if compiling:
            return custom_ops.call(self._op_index, q, k, v, meta, scale)
        bound = bind_call(self.provider, meta, q, k, v, scale, key_pages=self.key_pages)
        if not _capturing(q):  # bound inside a capture: its tensors (b * S_q) are filled only by replays
            calls[key] = bound
        return bound(q, k, v)

    def _flash_can_run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Host-only checks for the fast path; anything else goes to the original path unchanged."""
        return (
            q.dim() == 4
            and k.dim() == 4
            and k.shape == v.shape
            and q.shape[0] == k.shape[0]
            and q.shape[3] == k.shape[3]
            and k.shape[2] >= 1
            and q.shape[2] % k.shape[2] == 0  # GQA: each K/V head serves H / H_kv query heads
            and q.dtype in FLASH_DTYPES
            and q.dtype == k.dtype == v.dtype
            and q.device.type == self.device_type
            and q.device == k.device == v.device
            and q.shape[-1] % 8 == 0
            and q.shape[-1] <= MAX_HEAD_DIM
        )


def _capturing(q: torch.Tensor) -> bool:
    """Whether q's CUDA stream is capturing a graph (only asked when binding, never per block)."""
    return q.is_cuda and torch.cuda.is_current_stream_capturing()


def build_ops(
    provider: FlashProvider,
    *,
    general_strategy: Strategy | str | None = None,
    zero_copy: bool = True,
    device_type: str = "cuda",
    pack_queries: bool | None = None,
    key_pages: bool = False,
) -> VarlenDiffusionAttention:
    """The op group over ``provider`` (the injection seam for tests and benchmarks).

    ``general_strategy`` None reads ``ATTN_DISPATCH_VARLEN_DIFFUSION_STRATEGY``. ``zero_copy`` False
    packs even prefix/window masks (to compare strategies). ``device_type``: where q must live for the
    fast path ("cpu" only with a CPU stand-in provider and ``TRITON_INTERPRET=1``). ``pack_queries``
    (``qkv_pack``): None lets the cost model decide per mask; True or False forces (tests, benchmarks).
    ``key_pages``: packed strategies read K/V in place as one-row pages instead of gathering them
    (``binding._bind_key_pages``; an A/B option until measured on the target).
    """
    strategy = strategy_from_env() if general_strategy is None else Strategy(general_strategy)
    return VarlenDiffusionAttention(
        provider, general_strategy=strategy, zero_copy=zero_copy, device_type=device_type, pack_queries=pack_queries,
        key_pages=key_pages,
    )  # fmt: skip
