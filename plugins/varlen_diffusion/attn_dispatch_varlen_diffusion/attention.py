"""Key-padding-masked attention for diffusion models as varlen FlashAttention.

Same operations and signatures as the original path (``attn_dispatch.reference.masked``)::

    meta = ops.build_mask_meta(key_mask)                     # once per request: [B, S] bool/int mask
    out = ops.masked_attention(q, k, v, meta, softmax_scale=None)   # per block: [B, S, H, D] -> same

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

Fallback (the original SDPA path, called as is, so byte-identical): float (additive) masks, for which
``build_mask_meta`` returns the original plain ``MaskMeta``; ``S_q != S_k`` (cross attention) or any
shape difference between q, k and v; dtypes other than fp16/bf16; a head dim FlashAttention does not
take (not a multiple of 8, or over 256); tensors not on the provider's device type; a ``MaskMeta`` this
plugin did not make. Errors: a mask on another device than ``q`` raises ``ValueError`` naming
``mask_meta`` (as the original path does), so does a mask whose ``[B, S]`` differs from q's.

Syncs: ``build_mask_meta``: one device-to-host copy of three ints per request. ``masked_attention``:
none; it allocates, launches and returns, so it can be captured in a CUDA graph (sizes come from the
metadata; the max-seqlen bound is the padded S).
"""

from __future__ import annotations

import logging
import os

import torch

from attn_dispatch.checks import fail
from attn_dispatch_flash import FlashProvider
from attn_dispatch.plans import MaskMeta
from attn_dispatch.reference import masked as original

from .kernels import gather_rows, scatter_rows
from .meta import Strategy, VarlenMaskMeta, make_mask_meta

log = logging.getLogger("attn_dispatch")

STRATEGY_ENV = "ATTN_DISPATCH_VARLEN_DIFFUSION_STRATEGY"
GENERAL_STRATEGIES = (Strategy.KV_PACK, Strategy.QKV_PACK)
FLASH_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


def strategy_from_env() -> Strategy:
    """The general-mask strategy from ``ATTN_DISPATCH_VARLEN_DIFFUSION_STRATEGY`` (default ``kv_pack``).

    An unknown value is warned about and ignored, like the host's unreadable plugin switches.
    """
    value = os.environ.get(STRATEGY_ENV, "").strip().lower()
    if not value:
        return Strategy.KV_PACK
    for strategy in GENERAL_STRATEGIES:
        if value == strategy.value:
            return strategy
    choices = ", ".join(s.value for s in GENERAL_STRATEGIES)
    log.warning("%s=%r is not one of %s; using kv_pack", STRATEGY_ENV, value, choices)
    return Strategy.KV_PACK


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
    ) -> None:
        if general_strategy not in GENERAL_STRATEGIES:
            raise ValueError(f"general_strategy: expected kv_pack or qkv_pack, got {general_strategy!r}")
        self.provider = provider
        self.general_strategy = Strategy(general_strategy)
        self.zero_copy = zero_copy
        self.device_type = device_type
        self.pack_queries = pack_queries
        # Zero-copy under the zeroing contract leaves masked query rows to a zeroed `out`.
        self._zero_copy_skips_queries = provider.has_seqused_q and provider.writes_out

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
        return make_mask_meta(
            mask, general_strategy=self.general_strategy, zero_copy=self.zero_copy,
            zero_copy_skips_queries=self._zero_copy_skips_queries, pack_queries=self.pack_queries,
        )  # fmt: skip

    def masked_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask_meta: MaskMeta,
        *,
        softmax_scale: float | None = None,
    ) -> torch.Tensor:
        """``q``/``k``/``v`` ``[B, S, H, D]`` -> contiguous ``[B, S, H, D]``; contract in the module docstring."""
        if not isinstance(mask_meta, VarlenMaskMeta) or not self._flash_can_run(q, k, v):
            return original.masked_attention(q, k, v, mask_meta, softmax_scale=softmax_scale)
        meta = mask_meta
        if meta.key_mask.device != q.device:
            fail("mask_meta", f"key_mask is on {meta.key_mask.device} but q is on {q.device}")
        batch, seqlen, heads, head_dim = q.shape
        if (batch, seqlen) != (meta.batch, meta.seqlen):
            fail("mask_meta", f"key_mask shape {(meta.batch, meta.seqlen)} does not match q's [batch, seq] {(batch, seqlen)}")
        if meta.total == 0:  # no valid key anywhere: FlashAttention would write zeros; skip the launch
            return q.new_zeros(q.shape)
        scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
        rows = batch * seqlen

        if meta.pack_queries:
            q_p, k_p, v_p = gather_rows((q, k, v), meta.indices)
            out_p = self._flash(q_p, k_p, v_p, meta.cu_seqlens_k, meta.cu_seqlens_k, meta, scale)
            return scatter_rows(out_p, meta.inverse, batch, seqlen)

        q_rows = _token_rows(q)
        if meta.strategy is not Strategy.ZERO_COPY:  # kv_pack, or qkv_pack with Q left in place
            k_p, v_p = gather_rows((k, v), meta.indices)
            out = self._flash(q_rows, k_p, v_p, meta.cu_seqlens_padded, meta.cu_seqlens_k, meta, scale)
            if meta.masked is not None and meta.masked.numel():
                out.index_fill_(0, meta.masked, 0)
        elif meta.zero_masked_queries:  # zero-copy, masked query rows skipped into a zeroed output
            out = self._flash(
                q_rows, _token_rows(k), _token_rows(v), meta.cu_seqlens_k, meta.cu_seqlens_k, meta, scale,
                seqused_q=meta.seqlens, seqused_k=meta.seqlens, out=q.new_zeros((rows, heads, head_dim)),
            )  # fmt: skip
        else:
            out = self._flash(
                q_rows, _token_rows(k), _token_rows(v), meta.cu_seqlens_padded, meta.cu_seqlens_k, meta, scale,
                seqused_k=meta.seqlens,
            )  # fmt: skip
        return out.reshape(batch, seqlen, heads, head_dim)  # a view: out is contiguous

    def _flash_can_run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Host-only checks for the fast path; anything else goes to the original path unchanged."""
        return (
            q.dim() == 4
            and q.shape == k.shape == v.shape  # S_q != S_k (cross attention) and GQA shapes fall back
            and q.dtype in FLASH_DTYPES
            and q.dtype == k.dtype == v.dtype
            and q.device.type == self.device_type
            and q.device == k.device == v.device
            and q.shape[-1] % 8 == 0
            and q.shape[-1] <= MAX_HEAD_DIM
        )

    def _flash(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        cu_seqlens_k: torch.Tensor,
        meta: VarlenMaskMeta,
        scale: float,
        *,
        seqused_q: torch.Tensor | None = None,
        seqused_k: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One varlen forward, into ``out`` (allocated here when None and the provider can write into it)."""
        if out is None and self.provider.writes_out:
            out = torch.empty_like(q, memory_format=torch.contiguous_format)
        return self.provider.fwd(
            q, k, v, out=out, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
            seqused_q=seqused_q, seqused_k=seqused_k, max_seqlen_q=meta.seqlen, max_seqlen_k=meta.seqlen,
            softmax_scale=scale, causal=False,
        )  # fmt: skip


def _token_rows(x: torch.Tensor) -> torch.Tensor:
    """``[B, S, H, D]`` -> ``[B * S, H, D]``: a view when the strides allow (FlashAttention takes row and
    head strides), a copy otherwise; the last dim must be unit-stride for FlashAttention."""
    rows = x.reshape(x.shape[0] * x.shape[1], x.shape[2], x.shape[3])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def build_ops(
    provider: FlashProvider,
    *,
    general_strategy: Strategy | str | None = None,
    zero_copy: bool = True,
    device_type: str = "cuda",
    pack_queries: bool | None = None,
) -> VarlenDiffusionAttention:
    """The op group over ``provider`` (the injection seam for tests and benchmarks).

    ``general_strategy`` None reads ``ATTN_DISPATCH_VARLEN_DIFFUSION_STRATEGY``. ``zero_copy`` False
    packs even prefix/window masks (to compare strategies). ``device_type``: where q must live for the
    fast path ("cpu" only with a CPU stand-in provider and ``TRITON_INTERPRET=1``). ``pack_queries``
    (``qkv_pack``): None lets the cost model decide per mask; True or False forces (tests, benchmarks).
    """
    strategy = strategy_from_env() if general_strategy is None else Strategy(general_strategy)
    return VarlenDiffusionAttention(
        provider, general_strategy=strategy, zero_copy=zero_copy, device_type=device_type, pack_queries=pack_queries
    )
