"""Original path for masked (key-padding) attention in diffusion models (seed PR sglang #26318).

SDPA with a boolean key mask: correct everywhere, but the mask keeps SDPA off its flash kernels.
Layout is ``[batch, seq, heads, head_dim]`` as the diffusion models hold it. Queries and keys may differ
in length (cross attention: the mask is over the keys) and k/v may have fewer heads than q (GQA: each
kv head serves ``heads // kv_heads`` consecutive query heads). A query row whose keys are all masked
comes out as SDPA makes it (NaN or zeros, by backend and torch version).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..plans import MaskMeta
from ..validate import validate_build_mask_meta, validate_masked_attention


def build_mask_meta(key_mask: torch.Tensor) -> MaskMeta:
    """``key_mask`` ``[batch, seq_k]``: bool or int (nonzero = attend), or float (additive). Once per request."""
    validate_build_mask_meta(key_mask)
    if not key_mask.dtype.is_floating_point and key_mask.dtype != torch.bool:
        key_mask = key_mask != 0
    return MaskMeta(key_mask=key_mask)


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask_meta: MaskMeta,
    *,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """``q`` ``[B, S_q, H, D]``, ``k``/``v`` ``[B, S_k, H_kv, D]`` (``H_kv`` divides ``H``) -> ``[B, S_q, H, D]``,
    keys masked per ``mask_meta`` (``key_mask`` ``[B, S_k]``)."""
    validate_masked_attention(q, k, v, mask_meta, softmax_scale)
    attn_mask = mask_meta.key_mask[:, None, None, :]  # [B, 1, 1, S_k]: the same keys for every head and query
    if attn_mask.dtype.is_floating_point:
        attn_mask = attn_mask.to(q.dtype)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask, scale=softmax_scale,
        enable_gqa=k.shape[2] != q.shape[2],
    )  # fmt: skip
    return out.transpose(1, 2)
