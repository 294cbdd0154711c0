"""Per-forward unpadding metadata for the transformers integration (see ``transformers.py``).

transformers builds one attention mask per forward (one per layer type: full and sliding) through the
registered mask function, and hands that same tensor to every layer. The integration's mask function
returns exactly what ``sdpa`` gets (so the ``sdpa`` fallback is unchanged) and :func:`remember` records,
next to the returned tensor, the 2D padding mask and offsets it was made from. The first layer that
runs the fast path with that mask tensor calls :func:`metadata`, which builds the unpad indices,
``cu_seqlens`` and max lengths with one host sync; every later layer of the forward finds them on the
record (no sync, no rebuild). A record matches only the very tensor it was made for (identity) while
that tensor is unwritten (``_version``), and the newest few records are kept (older forwards' masks
drop out), so metadata is never stale.

Two routes, chosen once per forward by that build:

- padded (``Meta.padded``): each row's valid keys are one run that ends where its valid queries end, and
  its padding queries come first and see no key (left padding: ``generate``'s prefill and decode,
  Dynamic or Static cache). A padded plan (``make_attention_plan(key_starts=...)``) then reads
  transformers' q/k/v in place and writes the ``[B, Q, H, D]`` output directly: no pack, no scatter.
- packed: any other batch FlashAttention computes exactly (right padding, say): the valid rows are
  packed, run as varlen attention and scattered back (``RowMovers``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .unpad import RowMovers

_RECENT = 8  # masks kept: a forward makes one or two (full, sliding); a few forwards' worth is plenty
_records: deque[MaskRecord] = deque(maxlen=_RECENT)


@dataclass
class Stats:
    """Counters for tests: ``builds`` counts unpadding builds (each is one host sync), ``plans`` the plans
    made over them (each one launch of FA3's metadata kernel), ``padded_plans`` those of them padded."""

    builds: int = 0
    plans: int = 0
    padded_plans: int = 0


stats = Stats()


@dataclass
class Meta:
    """One forward's unpadding of one mask. ``exact`` False: the batch is not one FlashAttention's
    bottom-right-aligned causal call computes exactly (a hole inside a row's valid tokens, or valid
    queries that are not the row's last valid keys); every layer then falls back to ``sdpa``.

    ``padded``: the batch runs as a padded plan over ``key_starts``/``key_ends`` (each row's valid keys,
    as indices into the layer's key tensor). Otherwise, or where the op group cannot make padded plans
    (FA4), it is packed: ``packed()`` gives the indices, ``cu_seqlens`` and row movers, made on first use."""

    exact: bool
    padded: bool = False
    key_starts: torch.Tensor | None = None  # int32 [B]
    key_ends: torch.Tensor | None = None  # int32 [B]
    q_length: int = 0
    kv_length: int = 0
    q_valid: torch.Tensor | None = None  # bool [B, Q] / [B, K]: what the packed route packs
    k_valid: torch.Tensor | None = None
    counts: tuple[int, int, int, int] = (0, 0, 0, 0)  # max_q, max_k, total_q, total_k (host ints)
    packing: Packing | None = None
    out: dict = field(default_factory=dict)  # (heads, head_dim, dtype) -> [total_q, heads, head_dim] buffer
    runs: dict = field(default_factory=dict)  # (id(ops), heads, kv_heads, head_dim, dtype, params, scale) -> bound run

    def run_for(self, ops, query: torch.Tensor, kv_heads: int, params, scale: float | None):
        """The forward's bound attention call for a layer like this one: a plan over this batch (FA3's
        scheduler metadata made here, once) and ``bind_attention``'s run over it, made by the first such
        layer and reused by every other (one per distinct shape, params and scale: Gemma-2 has two).
        Padded where the batch allows and the op group can; else packed (``self.padded`` then turns False)."""
        _, heads, _, head_dim = query.shape
        key = (id(ops), heads, kv_heads, head_dim, query.dtype, params, scale)  # an op group may be unhashable
        run = self.runs.get(key)
        if run is None:
            shape = dict(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, dtype=query.dtype, layer_params=(params,))
            plan = None
            if self.padded and id(ops) not in _no_padded_plans:
                try:
                    plan = ops.make_attention_plan(
                        cache_seqlens=self.key_ends, key_starts=self.key_starts, max_seqlen_q=self.q_length,
                        max_seqlen_k=self.kv_length, **shape,
                    )  # fmt: skip
                    stats.padded_plans += 1
                except ValueError as exc:  # an op group without padded plans (FA4) says so by name, once
                    if not str(exc).startswith("key_starts"):
                        raise
                    _no_padded_plans.add(id(ops))
            if plan is None:
                self.padded = False
                p = self.packed()
                plan = ops.make_attention_plan(
                    cu_seqlens_q=p.cu_seqlens_q, cu_seqlens_k=p.cu_seqlens_k, max_seqlen_q=p.max_seqlen_q,
                    max_seqlen_k=p.max_seqlen_k, **shape,
                )  # fmt: skip
            stats.plans += 1
            run = self.runs[key] = ops.bind_attention(plan, params=params, softmax_scale=scale)
        return run

    def packed(self) -> Packing:
        """The packed route's indices, lengths and row movers (device work, no sync: the sizes are known)."""
        if self.packing is None:
            max_q, max_k, total_q, total_k = self.counts
            idx_q = torch.nonzero_static(self.q_valid.reshape(-1), size=total_q).squeeze(1)
            idx_k = torch.nonzero_static(self.k_valid.reshape(-1), size=total_k).squeeze(1)
            batch = self.q_valid.shape[0]
            self.packing = Packing(
                idx_q=idx_q,
                idx_k=idx_k,
                movers=RowMovers(idx_q, idx_k, batch, self.q_length, self.kv_length),
                cu_seqlens_q=F.pad(torch.cumsum(self.q_valid.sum(1), 0, dtype=torch.int32), (1, 0)),
                cu_seqlens_k=F.pad(torch.cumsum(self.k_valid.sum(1), 0, dtype=torch.int32), (1, 0)),
                max_seqlen_q=max_q,
                max_seqlen_k=max_k,
            )
        return self.packing

    def out_buffer(self, like: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
        """The packed route's output buffer every layer writes into (layers re-pad it before the next runs)."""
        key = (heads, head_dim, like.dtype)
        buf = self.out.get(key)
        if buf is None:
            buf = self.out[key] = like.new_empty(self.counts[2], heads, head_dim)
        return buf


# Op groups that refused a padded plan (FA4 reads no left-padded rows): they get packed plans from then on.
_no_padded_plans: set[int] = set()


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


def metadata(record: MaskRecord) -> Meta:
    """The record's unpadding metadata, built on first use (one host sync) and reused after."""
    if record.meta is None:
        record.meta = _build(record)
    return record.meta


def _build(r: MaskRecord) -> Meta:
    stats.builds += 1
    device = r.mask.device
    kv_pos = torch.arange(r.kv_length, device=device) + r.kv_offset  # absolute positions
    q_pos = torch.arange(r.q_length, device=device) + r.q_offset  # q_offset: an int, or a StaticCache's 0-dim tensor
    last = q_pos[-1]  # keys past the last query position are unwritten (StaticCache)
    if r.padding is None:
        k_valid = (kv_pos <= last).expand(r.batch, -1)
        q_valid = torch.ones(r.batch, r.q_length, dtype=torch.bool, device=device)
    else:
        padding = r.padding.to(device=device, dtype=torch.bool)
        k_valid = padding[:, kv_pos] & (kv_pos <= last)
        q_valid = padding.gather(1, q_pos.expand(r.batch, -1))
    n_k, first_k, contiguous_k = _runs(k_valid)
    n_q, first_q, contiguous_q = _runs(q_valid)
    # Bottom-right alignment is exact when each row's valid keys are one run and its valid queries are the
    # last tokens of that run (left or right padding, prefill or decode); distances (sliding windows) then
    # survive packing too.
    end_k = r.kv_offset + first_k + n_k
    end_q = r.q_offset + first_q + n_q
    aligned = contiguous_k & contiguous_q & ((n_q == 0) | (end_k == end_q))
    # Read in place (padded plan) when, besides, the valid queries end the query block and the padding
    # queries before them see no key (all queries valid, or as many keys as valid queries): FA3's batch
    # mode aligns all Q queries of a row bottom-right over its keys.
    in_place = aligned & (first_q + n_q == r.q_length) & ((n_q == r.q_length) | (n_k == n_q))
    summary = torch.stack([n_q.max(), n_k.max(), n_q.sum(), n_k.sum(), aligned.all().long(), in_place.all().long()]).tolist()  # the sync
    max_q, max_k, total_q, total_k, exact, padded = summary
    if not exact or total_q == 0:
        return Meta(exact=False)
    return Meta(
        exact=True,
        padded=bool(padded),
        key_starts=first_k.to(torch.int32),
        key_ends=(first_k + n_k).to(torch.int32),
        q_length=r.q_length,
        kv_length=r.kv_length,
        q_valid=q_valid,
        k_valid=k_valid,
        counts=(max_q, max_k, total_q, total_k),
    )


def _runs(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of a [B, L] bool mask: count, first valid index (0 if none), and whether the valid entries
    form one contiguous run. Device ops only."""
    count = valid.sum(1)
    first = torch.where(count > 0, valid.int().argmax(1), 0)
    cols = torch.arange(valid.shape[1], device=valid.device)
    run = (cols >= first[:, None]) & (cols < (first + count)[:, None])
    return count, first, (run == valid).all(1)


_unpadded: dict[tuple, Meta] = {}


def unpadded(device: torch.device, batch: int, q_length: int, kv_length: int) -> Meta:
    """The metadata of a batch with no padding mask (every row full), made once per shape, no sync, and
    reused across forwards (its plans too: nothing in them depends on the tokens). Like ``sdpa``, a
    longer key than query with Q > 1 (an empty StaticCache's prefill, top-left causal there) keeps the
    first Q keys."""
    key = (device, batch, q_length, kv_length)
    cached = _unpadded.get(key)
    if cached is None:
        end = q_length if 1 < q_length < kv_length else kv_length
        if len(_unpadded) > 64:
            _unpadded.clear()
        cached = _unpadded[key] = Meta(
            exact=True,
            padded=True,
            key_starts=torch.zeros(batch, dtype=torch.int32, device=device),
            key_ends=torch.full((batch,), end, dtype=torch.int32, device=device),
            q_length=q_length,
            kv_length=kv_length,
            q_valid=torch.ones(batch, q_length, dtype=torch.bool, device=device),
            k_valid=(torch.arange(kv_length, device=device) < end).expand(batch, -1),
            counts=(q_length, end, batch * q_length, batch * end),
        )
    return cached
