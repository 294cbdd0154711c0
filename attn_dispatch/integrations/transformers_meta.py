"""Per-forward unpadding metadata for the transformers integration (see ``transformers.py``).

transformers builds one attention mask per forward (one per layer type: full and sliding) through the
registered mask function, and hands that same tensor to every layer. The integration's mask function
returns exactly what ``sdpa`` gets (so the ``sdpa`` fallback is unchanged) and :func:`remember` records,
next to the returned tensor, the 2D padding mask and offsets it was made from. The first layer that
runs the fast path with that mask tensor makes the forward's :class:`Meta` (``transformers_build``: on
the host with one sync, or on the device for a decode step) and every later layer of the forward finds
it on the record (no sync, no rebuild). A record matches only the very tensor it was made for (identity) while
that tensor is unwritten (``_version``), and the newest few records are kept (older forwards' masks
drop out), so metadata is never stale.

A decode step (one query per row) reads the caches as one-row pages (``Meta.pages``: each row's
visible keys worked out on the device by ``transformers_decode``). Everything else takes one of two
routes, chosen once per forward by the host build:

- padded (``Meta.padded``): each row's valid keys are one run that ends where its valid queries end, and
  its padding queries come first and see no key (left padding: ``generate``'s prefill, or a decode step
  where an op group reads no one-row pages). A padded plan (``make_attention_plan(key_starts=...)``) then reads
  transformers' q/k/v in place and writes the ``[B, Q, H, D]`` output directly: no pack, no scatter.
- packed: any other batch FlashAttention computes exactly (right padding, say): the valid rows are
  packed, run as varlen attention and scattered back (``RowMovers``).
"""

from __future__ import annotations

import functools
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from ..plans import AttentionParams
from . import transformers_decode as decode
from .unpad import RowMovers

_RECENT = 8  # masks kept: a forward makes one or two (full, sliding); a few forwards' worth is plenty
_records: deque[MaskRecord] = deque(maxlen=_RECENT)


@dataclass
class Stats:
    """Counters for tests: ``builds`` counts host metadata builds (each is one host sync),
    ``device_builds`` decode steps' metadata made on the device (no sync, ``transformers_decode``),
    ``plans`` the plans made over them (each one launch of FA3's metadata kernel), ``padded_plans`` and
    ``paged_plans`` those of them padded and paged (one-row pages, decode)."""

    builds: int = 0
    device_builds: int = 0
    plans: int = 0
    padded_plans: int = 0
    paged_plans: int = 0


stats = Stats()


@dataclass
class Meta:
    """One forward's unpadding of one mask. ``exact`` False: the batch is not one FlashAttention's
    bottom-right-aligned causal call computes exactly (a hole inside a row's valid tokens, or valid
    queries that are not the row's last valid keys); every layer then falls back to ``sdpa``.

    ``padded``: the batch runs as a padded plan over ``key_starts``/``key_ends`` (each row's valid keys,
    as indices into the layer's key tensor). Otherwise, or where the op group cannot make padded plans
    (FA4), it is packed: ``packed()`` gives the indices, ``cu_seqlens`` and row movers, made on first use.

    ``pages``: a decode step (one query per row) of mask record ``step``; it runs as a paged plan of
    one-row pages, each row's visible keys worked out on the device (``transformers_decode.pages``)."""

    exact: bool
    padded: bool = False
    pages: bool = False
    step: MaskRecord | None = None  # the pages route's mask record
    key_starts: torch.Tensor | None = None  # int32 [B]
    key_ends: torch.Tensor | None = None  # int32 [B]
    q_length: int = 0
    kv_length: int = 0
    q_valid: np.ndarray | None = None  # bool [B, Q] / [B, K] on the host: what the packed route packs
    k_valid: np.ndarray | None = None
    device: torch.device | None = None
    packing: Packing | None = None
    out: dict = field(default_factory=dict)  # (heads, head_dim, dtype) -> [total_q, heads, head_dim] buffer
    runs: dict = field(default_factory=dict)  # (id(ops), heads, kv_heads, head_dim, dtype, window, softcap, scale) -> (ops, run)

    def run_for(self, ops, query: torch.Tensor, kv_heads: int, window: int | None, softcap: float | None, scale: float | None):
        """The forward's bound attention call for a layer like this one: a plan over this batch (FA3's
        scheduler metadata made here, once) and ``bind_attention``'s run over it, made by the first such
        layer and reused by every other (one per distinct shape, window, softcap and scale: Gemma-2 has two).
        Padded where the batch allows and the op group can; else packed (``self.padded`` then turns False)."""
        _, heads, _, head_dim = query.shape
        key = (id(ops), heads, kv_heads, head_dim, query.dtype, window, softcap, scale)  # an op group may be unhashable
        entry = self.runs.get(key)
        if entry is not None and entry[0] is ops:  # the entry holds the group: no other can take its id
            return entry[1]
        params = layer_params(window, float(softcap or 0.0))
        shape = dict(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, dtype=query.dtype)
        if self.pages:  # the window is in the page table: FA3 runs with none
            table, counts = decode.pages(self.step, kv_heads)
            plan = ops.make_attention_plan(
                cache_seqlens=counts, page_table=table, page_size=1, cu_seqlens_q=decode.cu_seqlens_q(self.step.batch, self.device),
                max_seqlen_q=1, max_seqlen_k=self.kv_length, layer_params=(layer_params(None, params.softcap),), **shape,
            )  # fmt: skip
            stats.plans += 1
            stats.paged_plans += 1
            run = ops.bind_attention(plan, params=plan.layer_params[0], softmax_scale=scale)
            self.runs[key] = (ops, run)
            return run
        shape["layer_params"] = (params,)
        plan = None
        if self.padded and _no_padded_plans.get(id(ops)) is not ops:
            try:
                plan = ops.make_attention_plan(
                    cache_seqlens=self.key_ends, key_starts=self.key_starts, max_seqlen_q=self.q_length,
                    max_seqlen_k=self.kv_length, **shape,
                )  # fmt: skip
                stats.padded_plans += 1
            except ValueError as exc:  # an op group without padded plans (FA4) says so by name, once
                if not str(exc).startswith("key_starts"):
                    raise
                refuse_in_place(ops)
        if plan is None:
            self.padded = False
            p = self.packed()
            plan = ops.make_attention_plan(
                cu_seqlens_q=p.cu_seqlens_q, cu_seqlens_k=p.cu_seqlens_k, max_seqlen_q=p.max_seqlen_q,
                max_seqlen_k=p.max_seqlen_k, **shape,
            )  # fmt: skip
        stats.plans += 1
        run = ops.bind_attention(plan, params=params, softmax_scale=scale)
        self.runs[key] = (ops, run)
        return run

    def packed(self) -> Packing:
        """The packed route's indices, lengths and row movers, from the host masks (one upload each)."""
        if self.packing is None:
            n_q, n_k = self.q_valid.sum(1), self.k_valid.sum(1)

            def up(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
                return torch.from_numpy(np.ascontiguousarray(array)).to(device=self.device, dtype=dtype)

            idx_q = up(np.flatnonzero(self.q_valid), torch.int64)
            idx_k = up(np.flatnonzero(self.k_valid), torch.int64)
            self.packing = Packing(
                idx_q=idx_q,
                idx_k=idx_k,
                movers=RowMovers(idx_q, idx_k, self.q_valid.shape[0], self.q_length, self.kv_length),
                cu_seqlens_q=up(np.concatenate([[0], np.cumsum(n_q)]), torch.int32),
                cu_seqlens_k=up(np.concatenate([[0], np.cumsum(n_k)]), torch.int32),
                max_seqlen_q=int(n_q.max()),
                max_seqlen_k=int(n_k.max()),
            )
        return self.packing

    def out_buffer(self, like: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
        """The packed route's output buffer every layer writes into (layers re-pad it before the next runs)."""
        key = (heads, head_dim, like.dtype)
        buf = self.out.get(key)
        if buf is None:
            buf = self.out[key] = like.new_empty(self.packed().idx_q.numel(), heads, head_dim)
        return buf


@functools.cache
def layer_params(window: int | None, softcap: float) -> AttentionParams:
    """transformers' causal attention with a sliding ``window`` (None: full) and ``softcap`` (0: none)."""
    return AttentionParams(causal=True, window_size=(window - 1, 0) if window else (-1, -1), softcap=softcap)


# Op groups that refused a padded plan (FA4 reads no left-padded rows), by id: they get packed plans from
# then on, and decode steps built on the host. Each is held, so its id never names another group.
_no_padded_plans: dict[int, object] = {}


def reads_in_place(ops) -> bool:
    """Whether ``ops`` has not refused a padded plan or one-row pages: both read transformers' caches in
    place; a group that cannot is kept to host-built packed plans."""
    return _no_padded_plans.get(id(ops)) is not ops


def refuse_in_place(ops) -> None:
    _no_padded_plans[id(ops)] = ops


@dataclass
class Packing:
    """The packed route of one forward: valid rows' indices, ``cu_seqlens`` and max lengths, row movers."""

    idx_q: torch.Tensor  # int64 [total_q]: rows of the [B*Q] flattened queries
    idx_k: torch.Tensor  # int64 [total_k]: rows of the [B*K] flattened keys
    movers: RowMovers  # packs q/k/v rows with idx_q/idx_k and scatters the output back
    cu_seqlens_q: torch.Tensor  # int32 [B + 1]
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int


@dataclass
class MaskRecord:
    """What a mask tensor was made from: ``padding`` is ``prepare_padding_mask``'s [B, >= kv_offset + K]
    bool mask (None: no padding), indexed by absolute position; ``window`` the sliding window (None: full)."""

    mask: torch.Tensor
    version: int | None  # None for an inference tensor (no version counter)
    padding: torch.Tensor | None
    batch: int
    q_length: int
    kv_length: int
    q_offset: int | torch.Tensor  # StaticCache passes a 0-dim tensor (copied here: the cache updates its own)
    kv_offset: int
    window: int | None
    meta: Meta | None = None


def remember(mask: torch.Tensor, **fields) -> None:
    """Record how ``mask`` was made (called by the mask function, no device work)."""
    if isinstance(fields.get("q_offset"), torch.Tensor):
        fields["q_offset"] = fields["q_offset"].clone()
    _records.appendleft(MaskRecord(mask=mask, version=version_of(mask), **fields))


def lookup(mask: torch.Tensor) -> MaskRecord | None:
    """The record of this very, unwritten, mask tensor, or None (a mask the integration did not make)."""
    for record in _records:
        if record.mask is mask:
            return record if record.version == version_of(mask) else None
    return None


def version_of(mask: torch.Tensor) -> int | None:
    """``mask._version``; None for a tensor made under ``torch.inference_mode()``, which has no version
    counter (reading it raises). Such a mask is matched by identity alone: the record holds it, so its
    memory is not reused, and it is made and read within one forward."""
    return None if mask.is_inference() else mask._version
