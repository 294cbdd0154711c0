"""The original code paths: portable torch, run wherever no active plugin provides an operation.

They define what each operation means; plugins must match them (bytes on the target, where the same
kernels run; FlashAttention tolerance for masked attention, which changes kernels).
"""

from .attention import make_attention_plan, paged_attention_out, varlen_attention_out
from .masked import build_mask_meta, masked_attention
from .mla import concatenated_query_view, mla_decode_query, mla_query_for_backend, mla_v_up_proj

__all__ = [
    "build_mask_meta",
    "concatenated_query_view",
    "make_attention_plan",
    "masked_attention",
    "mla_decode_query",
    "mla_query_for_backend",
    "mla_v_up_proj",
    "paged_attention_out",
    "varlen_attention_out",
]
