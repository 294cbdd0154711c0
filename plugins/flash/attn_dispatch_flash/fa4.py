"""The FA4 adapter: flash-attn-4's CuTe DSL forward, for sm100 (FA3's kernels are Hopper-only)."""

from __future__ import annotations

from .args import FlashArgs
from .fa3 import distribution_version, require_keywords
from .provider import BoundCall, FlashProvider


def fa4() -> FlashProvider:
    """flash-attn-4's private ``_flash_attn_fwd`` takes ``out=`` (the public varlen function does not). FA4
    schedules inside the kernel: there is no FA3-style metadata tensor to precompute."""
    from flash_attn.cute.interface import _flash_attn_fwd

    require_keywords("flash_attn.cute.interface._flash_attn_fwd", _flash_attn_fwd, ("out", "page_table", "seqused_q"))

    def bind_args(a: FlashArgs) -> BoundCall:
        if a.scheduler_metadata is not None or a.leftpad_k is not None:
            raise NotImplementedError("FA4 takes no FA3 scheduler metadata and no leftpad_k")
        left, right = a.window_size
        kw = dict(
            cu_seqlens_q=a.cu_seqlens_q, cu_seqlens_k=a.cu_seqlens_k, seqused_q=a.seqused_q,
            seqused_k=a.seqused_k, max_seqlen_q=a.max_seqlen_q, max_seqlen_k=a.max_seqlen_k,
            page_table=a.page_table, softmax_scale=a.softmax_scale, causal=a.causal,
            softcap=a.softcap if a.softcap > 0 else None, window_size_left=left if left >= 0 else None,
            window_size_right=right if right >= 0 else None, num_splits=a.num_splits, pack_gqa=a.pack_gqa,
        )  # fmt: skip

        def call(q, k, v, out):
            result, _lse = _flash_attn_fwd(q, k, v, out=out, **kw)
            return result

        return call

    return FlashProvider.from_binder(
        "fa4", 4, bind_args, None, writes_out=True, has_seqused_q=True, version=distribution_version("flash-attn-4")
    )  # fmt: skip
