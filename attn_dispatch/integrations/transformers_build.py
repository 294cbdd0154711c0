"""How a forward's metadata (``transformers_meta.Meta``) is made from its mask record, once per mask tensor.

* :func:`metadata`: a decode step (one query per row) on the device, with no sync, where the op group
  reads one-row pages (``transformers_decode``); anything else on the host (:func:`_build`: the padding
  mask copied down once, the route decided with a few numpy reductions, the key ranges uploaded).
* :func:`unpadded`: a batch with no padding mask, made once per shape and reused across forwards.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from . import transformers_decode as decode
from .transformers_meta import MaskRecord, Meta, reads_in_place, stats


def metadata(record: MaskRecord, ops) -> Meta:
    """The record's metadata, made on first use and reused after: on the device for a decode step (one
    query per row, no sync, ``transformers_decode``) where ``ops`` reads in place, else on the host (one sync)."""
    if record.meta is None:
        record.meta = _decode_step(record) if record.q_length == 1 and reads_in_place(ops) else _build(record)
    return record.meta


def _decode_step(r: MaskRecord) -> Meta:
    """Nothing is launched here: each op group's first layer makes its page table from the record
    (``Meta.run_for``, ``transformers_decode.pages``), over its own key/value heads."""
    stats.device_builds += 1
    if not decode.covers(r):
        return Meta(exact=False)
    step = replace(r, meta=None)  # the record holds its Meta: a copy keeps them out of a reference cycle
    return Meta(exact=True, pages=True, step=step, q_length=1, kv_length=r.kv_length, device=r.mask.device)


def _build(r: MaskRecord) -> Meta:
    """The forward's metadata, computed on the host: the padding mask comes down once (the forward's one
    sync), a few numpy reductions over ``[B, K]`` decide the route, and the key ranges go up in one copy.
    (The same on the device took some 60 small kernel launches per forward, several hundred us of host
    time in a decode step.) Positions are contiguous, so rows are sliced, not gathered: this runs in every
    decode step, where each host microsecond counts."""
    stats.builds += 1
    q_offset = int(r.q_offset)  # an int, or a StaticCache's 0-dim tensor (a sync of one scalar)
    # keys past the last query position are unwritten (StaticCache): only the first `written` keys count
    written = min(max(q_offset + r.q_length - r.kv_offset, 0), r.kv_length)
    if r.padding is None:
        k_valid = np.zeros((r.batch, r.kv_length), dtype=bool)
        k_valid[:, :written] = True
        q_valid = np.ones((r.batch, r.q_length), dtype=bool)
    else:
        if q_offset < 0 or r.kv_offset < 0 or r.padding.shape[-1] < max(q_offset + r.q_length, r.kv_offset + r.kv_length):
            return Meta(exact=False)  # positions outside the 2D mask: nothing this module knows how to read
        padding = r.padding.to(dtype=torch.bool).cpu().numpy()  # the sync
        k_valid = padding[:, r.kv_offset : r.kv_offset + r.kv_length].copy()
        k_valid[:, written:] = False
        q_valid = padding[:, q_offset : q_offset + r.q_length]
    n_k, first_k, contiguous_k = _runs(k_valid)
    n_q, first_q, contiguous_q = _runs(q_valid)
    # Bottom-right alignment is exact when each row's valid keys are one run and its valid queries are the
    # last tokens of that run (left or right padding, prefill or decode); distances (sliding windows) then
    # survive packing too.
    end_k = r.kv_offset + first_k + n_k
    end_q = q_offset + first_q + n_q
    aligned = contiguous_k & contiguous_q & ((n_q == 0) | (end_k == end_q))
    if not aligned.all() or not n_q.any():
        return Meta(exact=False)
    # Read in place (padded plan) when, besides, the valid queries end the query block and the padding
    # queries before them see no key (all queries valid, or as many keys as valid queries): FA3's batch
    # mode aligns all Q queries of a row bottom-right over its keys.
    in_place = (first_q + n_q == r.q_length) & ((n_q == r.q_length) | (n_k == n_q))
    ranges = torch.from_numpy(np.stack([first_k, first_k + n_k]).astype(np.int32)).to(r.mask.device)
    return Meta(
        exact=True,
        padded=bool(in_place.all()),
        key_starts=ranges[0],
        key_ends=ranges[1],
        q_length=r.q_length,
        kv_length=r.kv_length,
        q_valid=q_valid,
        k_valid=k_valid,
        device=r.mask.device,
    )


def _runs(valid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of a [B, L] bool mask: count, first valid index (0 if none), and whether the valid entries
    form one contiguous run (they do when the span from the first to the last holds them all)."""
    count = valid.sum(1)
    first = valid.argmax(1)  # 0 for a row with none
    last = valid.shape[1] - 1 - valid[:, ::-1].argmax(1)
    return count, first, (count == 0) | (last - first + 1 == count)


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
            q_valid=np.ones((batch, q_length), dtype=bool),
            k_valid=np.broadcast_to(np.arange(kv_length) < end, (batch, kv_length)),
            device=device,
        )
    return cached
