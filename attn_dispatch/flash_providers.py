"""FlashAttention providers behind one small interface, shared by every plugin that runs FA3/FA4.

The same FA3 kernels ship in several packages whose Python entry points differ in names and argument
order (``page_table`` vs ``block_table``, ``num_heads`` vs ``num_heads_q``, vllm's ``max_seqlen_q``
before ``cu_seqlens_q``). Each adapter maps one package onto :class:`FlashProvider`; plugins call only
the adapter. :func:`probe` tries them in order, importing nothing until it is called (at plugin load).

Only the tensors a call needs are passed; everything else is keyword-only and has FA3's default.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger("attn_dispatch")


@dataclass(frozen=True)
class FlashProvider:
    """One installed FlashAttention package, adapted.

    ``fwd(q, k, v, *, out, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, max_seqlen_q, max_seqlen_k,
    page_table, softmax_scale, causal, window_size, softcap, scheduler_metadata, num_splits, pack_gqa)``
    runs varlen attention and returns the output tensor. Paged KV: ``k``/``v`` are the caches
    ``[pages, page_size, kv_heads, d]`` with ``page_table`` and ``seqused_k`` (no ``cu_seqlens_k``).
    When ``writes_out`` is False the provider cannot write into a given ``out``: callers pass ``out=None``
    and copy the result once.

    ``scheduler_metadata(...)`` (None when unsupported) returns FA3's int32 metadata tensor for a batch;
    keyword arguments: batch_size, max_seqlen_q, max_seqlen_k, num_heads, num_kv_heads, head_dim,
    head_dim_v, cache_seqlens, cu_seqlens_q, page_size, dtype, causal, window_size, softcap, num_splits,
    pack_gqa.
    """

    name: str
    fa_version: int
    fwd: Callable[..., torch.Tensor]
    scheduler_metadata: Callable[..., torch.Tensor] | None
    writes_out: bool
    has_seqused_q: bool

    def describe(self) -> str:
        caps = ["out=" if self.writes_out else "copy into out"]
        if self.scheduler_metadata is not None:
            caps.append("scheduler metadata")
        if self.has_seqused_q:
            caps.append("seqused_q")
        return f"{self.name} (FA{self.fa_version}: {', '.join(caps)})"


def _vllm_fa3() -> FlashProvider:
    """vllm's bundled FA3. Calls the raw op, which (unlike the Python wrapper) takes seqused_q and pack_gqa."""
    from vllm.vllm_flash_attn import get_scheduler_metadata as vllm_metadata  # noqa: F401  (proves FA3 is there)

    fa3_fwd = torch.ops._vllm_fa3_C.fwd
    fa3_metadata = torch.ops._vllm_fa3_C.get_scheduler_metadata

    def fwd(
        q, k, v, *, out=None, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None, seqused_k=None,
        max_seqlen_q, max_seqlen_k, page_table=None, softmax_scale, causal, window_size=(-1, -1),
        softcap=0.0, scheduler_metadata=None, num_splits=0, pack_gqa=None,
    ):  # fmt: skip
        result = fa3_fwd(
            q, k, v, None, None, None, out,  # k_new, v_new, q_v
            cu_seqlens_q, cu_seqlens_k, None, seqused_q, seqused_k,  # cu_seqlens_k_new
            max_seqlen_q, max_seqlen_k, page_table,
            None, None, None, None, None, None, None, None,  # kv_batch_idx, leftpad_k, rotary x3, descales x3
            softmax_scale, causal, window_size[0], window_size[1], softcap,
            True, scheduler_metadata, num_splits, pack_gqa, 0,  # rotary_interleaved, ..., sm_margin
            None, 1, 0, None,  # s_aux, cp_world_size, cp_rank, cp_tot_seqused_k
        )  # fmt: skip
        return result[0]

    def scheduler_metadata(
        *, batch_size, max_seqlen_q, max_seqlen_k, num_heads, num_kv_heads, head_dim, head_dim_v,
        cache_seqlens, cu_seqlens_q, page_size, dtype, causal, window_size, softcap, num_splits, pack_gqa,
    ):  # fmt: skip
        return fa3_metadata(
            batch_size, max_seqlen_q, max_seqlen_k, num_heads, num_kv_heads, head_dim, head_dim_v, dtype,
            cache_seqlens, cu_seqlens_q, None, None, None, None,  # cu_seqlens_k, _k_new, seqused_q, leftpad
            page_size, 0, causal, window_size[0], window_size[1], softcap > 0, num_splits, pack_gqa, 0,
        )  # fmt: skip

    return FlashProvider("vllm_fa3", 3, fwd, scheduler_metadata, writes_out=True, has_seqused_q=True)


# Probe order: sglang's kernel package, then vllm's, then upstream FA3 (which cannot write into `out`).
PROVIDERS: dict[str, Callable[[], FlashProvider]] = {
    "vllm_fa3": _vllm_fa3,
}


def probe(order: tuple[str, ...] | None = None) -> tuple[FlashProvider | None, str]:
    """The first provider that imports, and a reason listing what failed when none does."""
    failures = []
    for name in order or tuple(PROVIDERS):
        try:
            return PROVIDERS[name](), ""
        except Exception as exc:  # ImportError, or a package present without its FA3 extension
            failures.append(f"{name}: {type(exc).__name__}: {exc}".splitlines()[0])
    return None, "no FlashAttention-3 provider importable (" + "; ".join(failures) + ")"
