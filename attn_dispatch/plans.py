"""Objects made once per batch (or per request) and consumed by every layer.

Each is produced by an operation of the same group as the one that consumes it (see ``ops.OP_GROUPS``),
so a plugin's plan never meets another implementation's kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionParams:
    """A layer's scheduling key: everything besides the batch that shapes FA3's split/tile schedule.

    ``window_size`` is ``(left, right)``; -1 means unbounded. ``softcap`` 0 means off. ``num_splits`` 0
    lets the kernel choose; ``pack_gqa`` None lets it choose. Two layers with equal params share metadata.
    """

    causal: bool = True
    window_size: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    num_splits: int = 0
    pack_gqa: bool | None = None

    def __post_init__(self) -> None:
        """Refuse what no kernel can schedule, naming the field (made once per model, so this costs nothing
        per call); a window given as a list becomes a tuple, so params stay hashable plan keys."""
        if not isinstance(self.causal, bool):
            raise ValueError(f"causal: expected a bool, got {self.causal!r}")
        window = self.window_size
        if (
            not isinstance(window, (tuple, list)) or len(window) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window)
        ):  # fmt: skip
            raise ValueError(f"window_size: expected (left, right) ints >= -1 (-1: unbounded), got {window!r}")
        object.__setattr__(self, "window_size", tuple(window))
        if isinstance(self.softcap, bool) or not isinstance(self.softcap, (int, float)) or self.softcap < 0:
            raise ValueError(f"softcap: expected a float >= 0 (0: off), got {self.softcap!r}")
        if isinstance(self.num_splits, bool) or not isinstance(self.num_splits, int) or self.num_splits < 0:
            raise ValueError(f"num_splits: expected an int >= 0 (0: the kernel chooses), got {self.num_splits!r}")
        if self.pack_gqa is not None and not isinstance(self.pack_gqa, bool):
            raise ValueError(f"pack_gqa: expected None or a bool, got {self.pack_gqa!r}")
        # Params key plans and bound calls looked up in every layer call: hash once, not per lookup.
        object.__setattr__(self, "_hash", hash((self.causal, self.window_size, self.softcap, self.num_splits, self.pack_gqa)))

    def __hash__(self) -> int:
        return self._hash


DEFAULT_PARAMS = AttentionParams()


@dataclass(frozen=True)
class AttentionPlan:
    """One forward batch, made once per step: paged attention (decode, or mixed extend + decode), packed
    (varlen) attention, or padded attention (a padded batch read in place).

    Tensors are the engine's own (int32, on the device); ints are host values the engine already has, so
    making or using a plan never syncs with the device. ``layer_params`` are the distinct
    :class:`AttentionParams` the batch was planned for: a layer may only use those (every implementation
    refuses others, the reference included, so engine code that runs on CPU runs on the GPU). A plugin's plan
    may subclass this to carry what its kernels precompute per batch (cuda_fa3's ``FlashPlan``: FA3's
    scheduler metadata).

    The three kinds (:attr:`kind`):

    * paged: ``page_table`` and ``page_size``; ``cache_seqlens`` counts each sequence's keys.
    * packed: ``cu_seqlens_k`` instead (the keys of sequence ``b`` are rows
      ``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` of ``k``); ``cache_seqlens`` are those segments' lengths.
    * padded: ``key_starts``, no ``cu_seqlens_q``. q/k/v stay ``[B, S, heads, d]`` (a padded batch, any
      strides but the last); row ``b``'s keys are ``k[b, key_starts[b]:cache_seqlens[b]]`` (so
      ``cache_seqlens`` holds each row's key end, not its count) and all ``max_seqlen_q`` of its queries
      attend to them, aligned bottom-right. This reads a left-padded batch with no pack and no scatter.
    """

    cache_seqlens: torch.Tensor  # [B] int32: keys per sequence, new tokens included (padded: each row's key end)
    page_table: torch.Tensor | None  # [B, max_pages] int32; None in a packed or padded plan
    cu_seqlens_q: torch.Tensor | None  # [B + 1] int32: query tokens per sequence (1 each in pure decode); None if padded
    max_seqlen_q: int  # padded: the batch's query length S_q
    max_seqlen_k: int  # padded: the batch's key length S_k (k.shape[1]), every key end <= it
    page_size: int | None  # None in a packed or padded plan
    num_heads: int
    num_kv_heads: int
    head_dim: int
    head_dim_v: int
    dtype: torch.dtype
    layer_params: tuple[AttentionParams, ...] = (DEFAULT_PARAMS,)
    provider: str = "reference"
    cu_seqlens_k: torch.Tensor | None = None  # [B + 1] int32 in a packed plan; else None
    key_starts: torch.Tensor | None = None  # [B] int32 in a padded plan: each row's first key; else None

    @property
    def batch_size(self) -> int:
        return self.cache_seqlens.shape[0]

    @property
    def paged(self) -> bool:
        return self.page_table is not None

    @property
    def kind(self) -> str:
        """``"paged"``, ``"packed"`` or ``"padded"``."""
        if self.page_table is not None:
            return "paged"
        return "padded" if self.key_starts is not None else "packed"


@dataclass(frozen=True)
class MaskMeta:
    """A key-padding mask, made once per request by ``build_mask_meta`` and reused by every block.

    ``key_mask`` is ``[B, S_k]``: bool (True = attend), or float (added to the scores, original path only).
    Plugins subclass this to carry varlen metadata; ``key_mask`` stays so any path can fall back to SDPA.
    """

    key_mask: torch.Tensor
