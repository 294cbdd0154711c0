"""One installed FlashAttention package behind one small interface: :class:`FlashProvider`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .args import FlashArgs

# A forward with its FlashArgs fixed: ``call(q, k, v, out)`` returns the output (``out`` itself, when the
# provider writes into it; ``out`` may be None, and must be for a provider with ``writes_out=False``).
BoundCall = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass(frozen=True)
class FlashProvider:
    """One installed FlashAttention package, adapted.

    Calling it, two equivalent ways:

    * ``bind(args)(q, k, v, out)`` with a :class:`FlashArgs` (or ``bind(**fields)``): everything but the
      tensors fixed once, for a call repeated with the same batch (every layer of a step). An adapter with a
      cheaper way to repeat a call (``bind_args``, e.g. the raw op's 37 positional arguments laid out once)
      uses it; otherwise the bound call is ``fwd`` with the fields as keywords.
    * ``fwd(q, k, v, *, out=None, **fields)``: one call, the fields of :class:`FlashArgs` as keywords.

    Both run varlen attention and return the output tensor. Paged KV: ``k``/``v`` are the caches
    ``[pages, page_size, kv_heads, d]`` with ``page_table`` and ``seqused_k`` (no ``cu_seqlens_k``). When
    ``writes_out`` is False the provider cannot write into a given ``out``: callers pass ``out=None`` and copy
    the result once. ``out`` is ``[total_q, heads, head_dim_v]``, contiguous in its last dim.
    ``has_seqused_q``: ``fwd`` takes ``seqused_q`` (sgl_kernel and upstream FA3: on the non-paged path only).
    A sequence with no keys (``seqlen_k == 0``) gets zeros, as FA3 writes them (varlen_diffusion relies on
    it for fully masked rows; FA4's behaviour there is unverified).

    ``scheduler_metadata(...)`` (None when unsupported) returns FA3's int32 metadata tensor for a batch;
    keyword arguments: batch_size, max_seqlen_q, max_seqlen_k, num_heads, num_kv_heads, head_dim,
    head_dim_v, cache_seqlens, cu_seqlens_q, page_size, dtype, causal, window_size, softcap, num_splits,
    pack_gqa, and ``leftpad_k`` (default None; batch mode: ``cache_seqlens`` are then key ends). It launches FA3's ``prepare_varlen_num_blocks`` once. A forward given that tensor must be
    scheduled identically: same batch, causal/window, softcap on/off, num_splits, pack_gqa, and the same
    key length. ``paged_seqlen_k_from_page_table`` says which key length a paged forward schedules for:
    False, the ``max_seqlen_k`` it is given (vllm's raw op); True, ``page_table.shape[1] * page_size``,
    because the package's paged entry point takes no ``max_seqlen_k`` (sgl_kernel, upstream FA3). Make the
    metadata with that length. ``varlen_takes_metadata``: the packed (varlen, no page table, no
    ``leftpad_k``) forward takes the metadata too; upstream FA3's ``flash_attn_varlen_func`` does not, so
    a packed call there schedules itself. :meth:`takes_metadata` says which calls to make it for.

    ``version``: the installed distribution's version (``vllm``'s for ``vllm_fa3``), "" when unknown;
    what known-wrong tables key on (a fixed build must not be slowed down by a guard for an old one).
    """

    name: str
    fa_version: int
    fwd: Callable[..., torch.Tensor]
    scheduler_metadata: Callable[..., torch.Tensor] | None
    writes_out: bool
    has_seqused_q: bool
    paged_seqlen_k_from_page_table: bool = False
    varlen_takes_metadata: bool = True
    bind_args: Callable[[FlashArgs], BoundCall] | None = None
    version: str = ""

    @classmethod
    def from_binder(
        cls, name: str, fa_version: int, bind_args: Callable[[FlashArgs], BoundCall], scheduler_metadata, **caps
    ) -> FlashProvider:
        """A provider whose adapter is written against :class:`FlashArgs` (``bind_args``); ``fwd`` follows."""

        def fwd(q, k, v, *, out=None, **fields):
            return bind_args(FlashArgs(**fields))(q, k, v, out)

        return cls(name, fa_version, fwd, scheduler_metadata, bind_args=bind_args, **caps)

    def bind(self, args: FlashArgs | None = None, /, **fields) -> BoundCall:
        """``bind(args)(q, k, v, out)`` is ``fwd(q, k, v, out=out, **args._asdict())``; ``bind(**fields)``
        builds the :class:`FlashArgs` first."""
        if args is None:
            args = FlashArgs(**fields)
        elif fields:
            raise TypeError("bind() takes a FlashArgs or its fields as keywords, not both")
        if self.bind_args is not None:
            return self.bind_args(args)
        fwd, keywords = self.fwd, args._asdict()
        return lambda q, k, v, out: fwd(q, k, v, out=out, **keywords)

    def takes_metadata(self, *, packed: bool) -> bool:
        """Whether a forward can be handed ``scheduler_metadata``: a packed one (``cu_seqlens_k``, no page
        table, no ``leftpad_k``) when ``packed``, else a paged or batch-mode one."""
        return self.scheduler_metadata is not None and (self.varlen_takes_metadata or not packed)

    def describe(self) -> str:
        caps = ["out=" if self.writes_out else "copy into out"]
        name = f"{self.name} {self.version}" if self.version else self.name
        if self.scheduler_metadata is not None:
            caps.append("scheduler metadata" + ("" if self.varlen_takes_metadata else " (paged only)"))
        if self.has_seqused_q:
            caps.append("seqused_q")
        return f"{name} (FA{self.fa_version}: {', '.join(caps)})"
