"""The original code paths: portable torch, run wherever no active plugin provides an operation.

They define what each operation means; plugins must match them (bytes on the target, where the same
kernels run; FlashAttention tolerance for masked attention, which changes kernels). Each first calls its
op's validator (``attn_dispatch.validate``), as the plugins do, so bad input is refused alike everywhere.
"""

from .attention import bind_attention, make_attention_plan, paged_attention_out, varlen_attention_out
from .masked import build_mask_meta, masked_attention
from .mla import mla_decode_query, mla_query_for_backend, mla_v_up_proj

__all__ = [
    "bind_attention",
    "build_mask_meta",
    "make_attention_plan",
    "masked_attention",
    "mla_decode_query",
    "mla_query_for_backend",
    "mla_v_up_proj",
    "paged_attention_out",
    "varlen_attention_out",
]
