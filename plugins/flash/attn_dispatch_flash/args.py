"""The arguments of one FlashAttention forward besides its tensors ``q, k, v, out``, as one typed record.

Every layer between an engine and the kernel passes a :class:`FlashArgs` instead of spelling the keyword
list out again; each provider adapter maps it onto its package's entry point once (see ``FlashProvider``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class FlashArgs(NamedTuple):
    """FA3's varlen forward arguments, with FA3's defaults. Build it with keywords.

    Non-paged (packed) attention: ``cu_seqlens_q`` and ``cu_seqlens_k`` (int32 ``[B + 1]``), optionally
    ``seqused_q`` / ``seqused_k`` (int32 ``[B]``: rows used from each sequence's start). Paged attention:
    ``page_table`` (int32 ``[B, max_pages]``) with ``seqused_k`` (keys per sequence), no ``cu_seqlens_k``.
    ``leftpad_k`` (int32 ``[B]``, batch mode: ``q``/``k``/``v`` ``[B, S, H, D]``, no page table): each row's
    keys start there and end at ``seqused_k`` (FA3's ``cache_leftpad``; FA3 only, FA4 refuses it). ``window_size`` is ``(left, right)``, -1 meaning unbounded; ``softcap`` 0 is off; ``num_splits`` 0 and
    ``pack_gqa`` None let the kernel choose. ``scheduler_metadata``: FA3's schedule precomputed for this
    batch and these scheduling arguments (``FlashProvider.scheduler_metadata``), or None.

    A NamedTuple rather than a frozen dataclass: ``FlashProvider.fwd`` makes one per call, and a frozen
    dataclass's ``__init__`` costs about 3 µs there, this one under 1 µs. Like any record holding tensors,
    do not compare two with ``==`` (tensors compare elementwise).
    """

    max_seqlen_q: int
    max_seqlen_k: int
    softmax_scale: float
    causal: bool
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    seqused_q: torch.Tensor | None = None
    seqused_k: torch.Tensor | None = None
    page_table: torch.Tensor | None = None
    window_size: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    scheduler_metadata: torch.Tensor | None = None
    num_splits: int = 0
    pack_gqa: bool | None = None
    leftpad_k: torch.Tensor | None = None
