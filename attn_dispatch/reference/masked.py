"""Original path for masked (key-padding) attention in diffusion models (seed PR sglang #26318).

SDPA with a boolean key mask: correct everywhere, but the mask keeps SDPA off its flash kernels.
Layout is ``[batch, seq, heads, head_dim]`` as the diffusion models hold it. A query row whose keys are
all masked comes out as SDPA makes it (NaN or zeros, by backend and torch version).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import check_tensor, fail
from ..plans import MaskMeta


def build_mask_meta(key_mask: torch.Tensor) -> MaskMeta:
    """``key_mask`` ``[batch, seq_k]``: bool or int (nonzero = attend), or float (additive). Once per request."""
    check_tensor("key_mask", key_mask, ndim=2)
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
    """``q`` ``[B, S_q, H, D]``, ``k``/``v`` ``[B, S_k, H, D]`` -> ``[B, S_q, H, D]``, keys masked per ``mask_meta``."""
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4, dtype=q.dtype, device=q.device)
    check_tensor("v", v, ndim=4, dtype=q.dtype, device=q.device)
    key_mask = mask_meta.key_mask
    if key_mask.device != q.device:
        fail("mask_meta", f"key_mask is on {key_mask.device} but q is on {q.device}")
    if tuple(key_mask.shape) != (k.shape[0], k.shape[1]):
        fail("mask_meta", f"key_mask shape {tuple(key_mask.shape)} does not match k's [batch, seq] {tuple(k.shape[:2])}")
    attn_mask = key_mask[:, None, None, :]
    if attn_mask.dtype.is_floating_point:
        attn_mask = attn_mask.to(q.dtype)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask, scale=softmax_scale
    )
    return out.transpose(1, 2)
