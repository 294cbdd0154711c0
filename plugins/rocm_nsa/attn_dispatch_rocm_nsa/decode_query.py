"""Both sides of the NSA/DSA decode query hand-off, with the concatenation skipped where it can be.

The model holds the absorbed query as one ``q_cat`` ``(tokens, heads, kv_lora_rank + rope_dim)``. The
original path splits it into views, and the backend's tilelang/aiter decode concatenates them again.
Here, in decode with those impls, the model passes ``q_cat`` itself (``q_rope=None``) and the backend
views it: no ``torch.cat``, and the same bytes reach the kernel.
"""

from __future__ import annotations

import torch

from attn_dispatch import reference
from attn_dispatch.validate import validate_mla_decode_query, validate_mla_query_for_backend

# Decode impls whose kernels read the (tokens, heads, 576) query as one tensor and take q_cat as is.
CAT_SKIPPING_DECODE_IMPLS = frozenset({"tilelang", "aiter"})


def mla_query_for_backend(
    q: torch.Tensor,
    q_rope: torch.Tensor | None,
    *,
    is_decode: bool,
    decode_impl: str,
    kv_lora_rank: int | None = None,
    llama_4_scaling: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Model side: in tilelang/aiter decode, pass ``q_cat`` on as ``(q_cat, None)``; else the original.

    ``llama_4_scaling`` multiplies only the first ``kv_lora_rank`` channels of ``q_cat``, in place: the
    same elements the original scales through its ``q_nope`` view.
    """
    if q_rope is not None or not is_decode or decode_impl not in CAT_SKIPPING_DECODE_IMPLS:
        return reference.mla_query_for_backend(
            q, q_rope, is_decode=is_decode, decode_impl=decode_impl, kv_lora_rank=kv_lora_rank, llama_4_scaling=llama_4_scaling
        )
    validate_mla_query_for_backend(q, q_rope, is_decode, decode_impl, kv_lora_rank, llama_4_scaling)
    if llama_4_scaling is not None:
        q[..., :kv_lora_rank].mul_(llama_4_scaling)
    return q, None


def mla_decode_query(
    q: torch.Tensor,
    q_rope: torch.Tensor | None,
    *,
    num_heads: int,
    kv_lora_rank: int,
    decode_impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backend side: given ``q_cat`` (``q_rope=None``) in tilelang/aiter decode, view it; else the original.

    Returns ``(q_all, q_nope, q_rope)``; here ``q_all`` is a view of ``q_cat`` (the original concatenates
    its split views again: same bytes, one copy). Inputs are checked by the op's validator, as in the
    original, so mismatched heads or widths raise the same ``ValueError`` on both paths.
    """
    if q_rope is not None or decode_impl not in CAT_SKIPPING_DECODE_IMPLS:
        return reference.mla_decode_query(q, q_rope, num_heads=num_heads, kv_lora_rank=kv_lora_rank, decode_impl=decode_impl)
    q_cat, _ = validate_mla_decode_query(q, q_rope, num_heads, kv_lora_rank, decode_impl)  # the op's rules
    q_all = q_cat.contiguous()  # a no-op for the model's own q_cat: q_all is a view of it
    return q_all, q_all[..., :kv_lora_rank], q_all[..., kv_lora_rank:]
