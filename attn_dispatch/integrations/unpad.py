"""Row movers for the transformers integration: pack the valid rows of padded q/k/v, scatter the output back.

transformers hands attention ``[B, H, L, D]`` tensors; varlen FlashAttention takes packed ``[total, H, D]``
rows. In a padded forward every layer packs Q, K and V with the forward's indices and scatters its output
back to ``[B, L, H, D]``, zeros in the padded rows. :class:`RowMovers` does both for one forward's indices
(``transformers_meta.Packing.idx_q`` / ``idx_k``), by one of two routes. Both are plain copies, so their
results are byte-identical:

- ``"triton"``: the fused row movers of :mod:`attn_dispatch_flash.rows_launch` (the ones varlen_diffusion
  uses, imported from there: one definition), bound once per input layout so later layers skip Triton's
  per-call Python. K and V are packed in one launch; the scatter writes every row (zeros included) in one.
- ``"torch"``: ``x[b, s]`` advanced indexing to pack, ``zeros.index_copy_`` to scatter.

The route is chosen once, in the constructor: ``"triton"`` on CUDA wherever ``attn_dispatch_flash.rows``
imports, prefill and decode alike. Measured on the H200 (bf16, 32/8 heads of 128), host / GPU us per call,
torch vs Triton: K+V of 8 rows x 2048 keys 20/204 vs 15/38, of 32 x 4096 21/1526 vs 16/264 (decode packs
the whole cache each layer); scatter 19/20 vs 11/12; only Q alone is a little cheaper on the host with
torch (10/12 vs 14/15), so one route keeps it simple. ``"torch"`` off CUDA and without Triton
(``pip install 'attn-dispatch-flash[rows]'``). ``route=`` forces one (tests, benchmarks); on CPU the Triton
route works only under ``TRITON_INTERPRET=1``, where the kernels run interpreted.

No method syncs with the host, and every output is a new contiguous tensor, so a forward that uses them
can be captured in a CUDA graph. The first call per input layout binds (compiles) a Triton launch: make it
before capturing, as any warm-up does.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from types import ModuleType

import torch

log = logging.getLogger("attn_dispatch")

ROUTES = ("triton", "torch")


@functools.cache
def _rows_launch() -> ModuleType | None:
    """``attn_dispatch_flash.rows_launch``, or None where it (Triton, or attn_dispatch_flash) is missing.

    Imported on first need, not with this module: Triton reads ``TRITON_INTERPRET`` when the kernels are
    defined, and only users of the Triton route should pay for importing it."""
    try:
        from attn_dispatch_flash import rows_launch
    except ImportError as exc:
        log.debug("attn_dispatch unpad: Triton row movers unavailable (%s); using torch index ops", exc)
        return None
    return rows_launch


def _layout(x: torch.Tensor) -> tuple:
    """What a bound launch depends on besides the indices: shape, strides, dtype, and whether the data
    pointer is 16-byte aligned (Triton specializes pointers on it)."""
    return (x.shape, x.stride(), x.dtype, x.data_ptr() % 16 == 0)


class RowMovers:
    """Pack the valid rows of [B, L, H, D] views and scatter packed rows back, for one forward's indices.

    ``idx_q`` / ``idx_k``: int64 flat row indices ``b * L + s`` of the valid query / key rows, in the
    order the packed tensors hold them (``transformers_meta.Packing.idx_q`` / ``idx_k``), on the device of
    the tensors to move. ``batch``, ``q_len``, ``kv_len``: the padded sizes they index. ``route``:
    ``"triton"``, ``"torch"``, or None to choose (see the module docstring); the choice is ``.route``.

    Inputs are ``[B, L, H, D]`` tensors of any strides (``query.transpose(1, 2)`` of transformers'
    ``[B, H, L, D]``, say); K/V may have fewer heads than Q (GQA).
    """

    def __init__(
        self, idx_q: torch.Tensor, idx_k: torch.Tensor, batch: int, q_len: int, kv_len: int, *, route: str | None = None
    ) -> None:
        device = idx_q.device
        if route is None:
            route = "triton" if device.type == "cuda" and _rows_launch() is not None else "torch"
        elif route not in ROUTES:
            raise ValueError(f"route must be one of {ROUTES} or None, got {route!r}")
        elif route == "triton" and _rows_launch() is None:
            raise ImportError("route='triton' needs attn_dispatch_flash.rows (pip install 'attn-dispatch-flash[rows]')")
        self.route = route
        self.batch, self.q_len, self.kv_len = batch, q_len, kv_len
        self.idx_q, self.idx_k = idx_q, idx_k
        if route == "triton":
            # The kernels take int32 indices, and the scatter an inverse map: each padded row's packed
            # position, -1 for a padded row (written as zeros). Device ops only: no sync.
            self._idx_q32 = idx_q.to(torch.int32).contiguous()
            self._idx_k32 = idx_k.to(torch.int32).contiguous()
            self._inverse = torch.full((batch * q_len,), -1, dtype=torch.int32, device=device)
            self._inverse.index_copy_(0, idx_q, torch.arange(idx_q.numel(), dtype=torch.int32, device=device))
            self._bound: dict[tuple, Callable[..., torch.Tensor]] = {}
        else:
            # (batch, position) index pairs: x[b, s] gathers the rows of a strided view in one copy, where
            # index_select would need a [B * L] row view (a copy of the whole tensor for a transposed one).
            self._rows_q = (idx_q // q_len, idx_q % q_len)
            self._rows_k = (idx_k // kv_len, idx_k % kv_len)

    def pack_q(self, query_bshd: torch.Tensor) -> torch.Tensor:
        """The valid query rows: ``[total_q, H, D]``, contiguous."""
        if self.route == "torch":
            return query_bshd[self._rows_q]
        key = ("q", *_layout(query_bshd))
        gather = self._bound.get(key)
        if gather is None:
            gather = self._bound[key] = self._bind_gather((query_bshd,), self._idx_q32, self.q_len)
        return gather(query_bshd)[0]

    def pack_kv(self, key_bshd: torch.Tensor, value_bshd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The valid key and value rows: ``[total_k, H_kv, D]`` each, contiguous."""
        if self.route == "torch":
            return key_bshd[self._rows_k], value_bshd[self._rows_k]
        key = ("kv", *_layout(key_bshd), *_layout(value_bshd))
        gather = self._bound.get(key)
        if gather is None:
            gather = self._bound[key] = self._bind_kv(key_bshd, value_bshd)
        return gather(key_bshd, value_bshd)

    def scatter(self, packed: torch.Tensor) -> torch.Tensor:
        """Packed rows ``[total_q, H, D]`` back to a new contiguous ``[B, q_len, H, D]``, zeros in padded rows."""
        if self.route == "torch":
            padded = packed.new_zeros(self.batch * self.q_len, *packed.shape[1:])
            return padded.index_copy_(0, self.idx_q, packed).view(self.batch, self.q_len, *packed.shape[1:])
        key = ("out", *_layout(packed))
        scatter = self._bound.get(key)
        if scatter is None:
            assert packed.dim() == 3 and packed.shape[0] == self.idx_q.numel(), (
                f"packed must be [{self.idx_q.numel()}, H, D], got shape {tuple(packed.shape)}"
            )
            scatter = self._bound[key] = _rows_launch().bind_scatter(packed, self._inverse, self.batch, self.q_len)
        return scatter(packed)

    # ---- binding (once per input layout) ----------------------------------------------------------------

    def _bind_gather(
        self, like: tuple[torch.Tensor, ...], indices: torch.Tensor, length: int
    ) -> Callable[..., torch.Tensor]:
        for x in like:
            assert x.dim() == 4 and tuple(x.shape[:2]) == (self.batch, length), (
                f"expected a [{self.batch}, {length}, H, D] tensor, got shape {tuple(x.shape)}"
            )
        return _rows_launch().bind_gather(like, indices)

    def _bind_kv(
        self, k: torch.Tensor, v: torch.Tensor
    ) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """K and V in one launch where the kernel can take both (same shape, dtype and strides: the usual
        case, views of one cache or projection layout); else one launch each."""
        if k.shape == v.shape and k.dtype == v.dtype and k.stride() == v.stride():
            gather_kv = self._bind_gather((k, v), self._idx_k32, self.kv_len)
            return lambda k, v: gather_kv(k, v).unbind(0)  # [2, total_k, H_kv, D]: each half contiguous
        gather_k = self._bind_gather((k,), self._idx_k32, self.kv_len)
        gather_v = self._bind_gather((v,), self._idx_k32, self.kv_len)
        return lambda k, v: (gather_k(k)[0], gather_v(v)[0])
