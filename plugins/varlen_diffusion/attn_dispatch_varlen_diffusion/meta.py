"""Per-request mask metadata: the layout of a key-padding mask, the strategy it picks, and varlen tensors.

:func:`make_mask_meta` runs once per request (the engine reuses the result in every block). It costs one
device-to-host copy of three integers (valid-token count, most runs in a row, latest run start): the
strategy is a host decision and the packed sizes are host shapes. Everything else stays on the device,
and nothing in :class:`VarlenMaskMeta` needs another sync when a layer uses it.

Layouts (per request, over all rows of the batch):

- ``prefix``: each row's valid keys are ``0..n-1`` (right padding, no padding, or none valid).
- ``window``: each row's valid keys are one contiguous run ``a..a+n-1`` (left padding, or both sides).
- ``general``: some row has two or more runs (gaps: e.g. text, its padding, then image tokens).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from attn_dispatch import MaskMeta


class Layout(str, enum.Enum):
    PREFIX = "prefix"
    WINDOW = "window"
    GENERAL = "general"


class Strategy(str, enum.Enum):
    """How the tensors reach FlashAttention (see the ``attention`` module for each one's contract)."""

    ZERO_COPY = "zero_copy"
    KV_PACK = "kv_pack"
    QKV_PACK = "qkv_pack"


@dataclass(frozen=True, eq=False)
class VarlenMaskMeta(MaskMeta):
    """A boolean key mask ``[B, S]`` plus what varlen FlashAttention needs for it. All tensors int32.

    ``cu_seqlens_k``: zero-copy: ``b * S + run start`` (the padded tensor's own rows, read with
    ``seqlens`` as seqused); packed strategies: the prefix sum of ``seqlens`` over the packed rows.
    ``indices`` (packed strategies only): flat ``b * S + s`` of each valid token, in order. ``kv_pack``
    lists every masked token's after them, also in order: ``[B * S]``, a length fixed by the mask's shape,
    so the K/V gather, its launch and the compiled op depend on the shape alone (a CUDA graph captured for
    one mask replays right for another of that shape; FlashAttention reads only ``cu_seqlens_k``'s rows).
    ``qkv_pack``: the valid tokens only, ``[total]``.
    ``page_table`` (packed strategies, made only when asked for): ``[B, S]``, row b's valid flat indices
    first (the rest 0): the keys as one-row pages of the padded tensor, for FlashAttention's paged read.
    ``pack_queries`` (``qkv_pack`` only): Q is packed too and ``inverse`` holds each padded token's packed
    position, -1 where masked (the scatter's map); otherwise Q stays in place, as in ``kv_pack``, and
    ``masked`` (int64) lists the flat positions of masked tokens, whose output rows are zeroed.
    ``batch``/``seqlen`` are the key mask's: ``seqlen`` is S_k. Queries may have another length
    (cross-attention); every query row is then valid, whatever the strategy.
    """

    layout: Layout | None  # None: not known on the host (made by the custom op from its tensors alone)
    strategy: Strategy
    zero_masked_queries: bool  # True: rows of masked query tokens come out as zeros (qkv_pack contract)
    batch: int
    seqlen: int
    total: int | None  # valid tokens in the batch; None: not known on the host, as layout
    seqlens: torch.Tensor  # [B]
    cu_seqlens_padded: torch.Tensor  # [B + 1]: b * S
    cu_seqlens_k: torch.Tensor  # [B + 1]
    indices: torch.Tensor | None = None  # kv_pack: [B * S], valid first; qkv_pack: [total]
    page_table: torch.Tensor | None = None  # [B, S]
    pack_queries: bool = False
    inverse: torch.Tensor | None = None  # [B * S]
    masked: torch.Tensor | None = None  # [B * S - total]
    # Bound per-call paths (``binding.bind_call``) by ``binding.call_key``: filled by masked_attention,
    # never shared between metas, so a new mask can never reach an old mask's tensors.
    calls: dict = field(default_factory=dict, repr=False)


# Under qkv_pack, packing Q (and scattering the output back) pays when the attention time saved by dropping
# masked query rows exceeds the bytes it moves. Per dropped row attention saves 4 * keys * H * D FLOPs;
# packing Q and scattering moves 8 * H * D bytes per row of the batch. So pack when
#     masked rows / all rows * mean valid keys > 2 * attention FLOP/s / copy B/s,
# about 2 * 500e12 / 3.6e12 = 280 for FA3 on the H200 (bf16 forward; copy at 85% of 4.25 TB/s).
QUERY_PACK_BREAK_EVEN = 280.0


def packing_queries_pays(batch: int, seqlen: int, total: int) -> bool:
    """Whether ``qkv_pack`` should pack Q for a mask with ``total`` valid tokens of ``batch * seqlen``."""
    rows = batch * seqlen
    return (rows - total) / rows * (total / batch) > QUERY_PACK_BREAK_EVEN


def classify(key_mask: torch.Tensor) -> tuple[Layout, int, torch.Tensor, torch.Tensor]:
    """(layout, valid-token count, valid keys per row, first valid key per row); one host sync."""
    seqlens = key_mask.sum(dim=1, dtype=torch.int32)
    previous = torch.cat([key_mask.new_zeros(key_mask.shape[0], 1), key_mask[:, :-1]], dim=1)
    run_starts = key_mask & ~previous
    runs = run_starts.sum(dim=1, dtype=torch.int32)
    # argmax returns the first maximum; rows with no valid key get start 0.
    first = torch.where(seqlens > 0, key_mask.to(torch.uint8).argmax(dim=1).to(torch.int32), 0)
    stats = torch.stack([seqlens.sum(dtype=torch.int32), runs.max(), first.max()])
    total, max_runs, max_first = stats.tolist()  # the one sync per request
    if max_runs > 1:
        layout = Layout.GENERAL
    elif max_first > 0:
        layout = Layout.WINDOW
    else:
        layout = Layout.PREFIX
    return layout, total, seqlens, first


def make_mask_meta(
    key_mask: torch.Tensor,
    *,
    general_strategy: Strategy,
    zero_copy: bool = True,
    zero_copy_skips_queries: bool = True,
    pack_queries: bool | None = None,
    key_pages: bool = False,
) -> VarlenMaskMeta:
    """Build the metadata for a bool ``[B, S]`` mask (B, S >= 1) and pick its strategy.

    ``general_strategy`` (``kv_pack`` or ``qkv_pack``) is used for general layouts and fixes the
    masked-query contract: ``qkv_pack`` zeros masked query rows in every layout. ``zero_copy`` False
    forces the packed strategy (benchmarks). ``zero_copy_skips_queries``: the provider can leave masked
    query rows out (``seqused_q`` and ``out=``), which zero-copy needs under the zeroing contract.
    ``pack_queries`` (``qkv_pack``): None decides with :func:`packing_queries_pays`; True or False forces.
    ``key_pages``: also make ``page_table`` (packed strategies), for K/V read in place as one-row pages.
    """
    assert key_mask.dtype == torch.bool and key_mask.dim() == 2, f"expected a bool [B, S] mask, got {key_mask.dtype}"
    assert general_strategy in (Strategy.KV_PACK, Strategy.QKV_PACK), f"not a general-mask strategy: {general_strategy}"
    batch, seqlen = key_mask.shape
    device = key_mask.device
    layout, total, seqlens, first = classify(key_mask)
    zero_masked_queries = general_strategy is Strategy.QKV_PACK
    if layout is not Layout.GENERAL and zero_copy and (zero_copy_skips_queries or not zero_masked_queries):
        strategy = Strategy.ZERO_COPY
    else:
        strategy = general_strategy

    cu_seqlens_padded = torch.arange(batch + 1, dtype=torch.int32, device=device) * seqlen
    indices = inverse = masked = page_table = None
    pack_queries = strategy is Strategy.QKV_PACK and (
        packing_queries_pays(batch, seqlen, total) if pack_queries is None else pack_queries
    )
    if strategy is Strategy.ZERO_COPY:
        cu_seqlens_k = cu_seqlens_padded.clone()
        cu_seqlens_k[:-1] += first
    else:
        cu_seqlens_k = torch.cat([seqlens.new_zeros(1), seqlens.cumsum(0, dtype=torch.int32)])
        flat_mask = key_mask.reshape(-1)
        packed_pos = flat_mask.cumsum(0, dtype=torch.int32) - 1
        # Scatter each valid token's flat index to its packed slot (torch.nonzero would give the same, at the
        # price of a second sync); masked tokens go after them (kv_pack) or to one spare slot (qkv_pack).
        flat = torch.arange(batch * seqlen, dtype=torch.int32, device=device)
        if strategy is Strategy.KV_PACK:
            masked_slot = total + (~flat_mask).cumsum(0, dtype=torch.int32) - 1
            slots = torch.where(flat_mask, packed_pos, masked_slot).long()
            indices = torch.empty(batch * seqlen, dtype=torch.int32, device=device).scatter_(0, slots, flat)
        else:
            slots = torch.where(flat_mask, packed_pos, total).long()
            indices = torch.empty(total + 1, dtype=torch.int32, device=device).scatter_(0, slots, flat)[:total]
        if key_pages:  # row b's k-th valid key goes to column k of row b: b * S + (packed position - row start)
            row_start = cu_seqlens_k[:-1].repeat_interleave(seqlen)
            cells = torch.where(flat_mask, flat - flat % seqlen + packed_pos - row_start, batch * seqlen).long()
            page_table = torch.zeros(batch * seqlen + 1, dtype=torch.int32, device=device).scatter_(0, cells, flat)
            page_table = page_table[:-1].view(batch, seqlen)
        if pack_queries:
            inverse = torch.where(flat_mask, packed_pos, -1)
        elif strategy is Strategy.QKV_PACK:
            n_masked = batch * seqlen - total
            masked_pos = (~flat_mask).cumsum(0) - 1
            slots = torch.where(flat_mask, n_masked, masked_pos)
            masked = torch.empty(n_masked + 1, dtype=torch.int64, device=device).scatter_(0, slots, flat.long())[:n_masked]
    return VarlenMaskMeta(
        key_mask=key_mask, layout=layout, strategy=strategy, zero_masked_queries=zero_masked_queries,
        batch=batch, seqlen=seqlen, total=total, seqlens=seqlens, cu_seqlens_padded=cu_seqlens_padded,
        cu_seqlens_k=cu_seqlens_k, indices=indices, pack_queries=pack_queries, inverse=inverse, masked=masked,
        page_table=page_table,
    )  # fmt: skip
