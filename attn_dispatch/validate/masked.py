"""Rules of the ``masked_attention`` group: ``build_mask_meta`` and ``masked_attention``."""

from __future__ import annotations

import torch

from ..checks import FLOAT_DTYPES, check_instance, check_scale, check_tensor, fail
from ..plans import MaskMeta


def validate_build_mask_meta(key_mask: torch.Tensor) -> None:
    """``key_mask`` ``[batch, seq_k]``: bool or int (nonzero = attend), or float (added to the scores)."""
    check_tensor("key_mask", key_mask, ndim=2)
    if key_mask.dtype.is_complex:
        fail("key_mask", f"expected bool, int or float, got {key_mask.dtype}")


def validate_masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask_meta: MaskMeta,
    softmax_scale: float | None = None,
) -> None:
    """Rules of ``masked_attention``.

    ``q`` ``[B, S_q, H, D]``; ``k``/``v`` ``[B, S_k, H_kv, D]`` with ``H_kv`` dividing ``H`` (GQA; no
    broadcast of one over the other) and ``S_k`` free (cross attention); ``mask_meta.key_mask``
    ``[B, S_k]`` on ``q``'s device.
    """
    check_tensor("q", q, ndim=4, dtype=FLOAT_DTYPES)
    check_tensor("k", k, ndim=4, dtype=q.dtype, device=q.device)
    check_tensor("v", v, ndim=4, dtype=q.dtype, device=q.device)
    batch, _, heads, head_dim = q.shape
    if heads == 0 or head_dim == 0:
        fail("q", f"needs at least one head and head_dim > 0, got shape {tuple(q.shape)}")
    if k.shape[0] != batch:
        fail("k", f"batch {k.shape[0]} differs from q's {batch}")
    if k.shape[3] != head_dim:
        fail("k", f"head_dim {k.shape[3]} differs from q's {head_dim}")
    kv_heads = k.shape[2]
    if kv_heads == 0 or heads % kv_heads:
        fail("q", f"{heads} heads is not a multiple of the {kv_heads} heads of k (GQA groups must divide)")
    if v.shape != k.shape:
        fail("v", f"shape {tuple(v.shape)} differs from k's {tuple(k.shape)}")
    check_instance("mask_meta", mask_meta, MaskMeta, " from build_mask_meta")
    key_mask = mask_meta.key_mask
    check_tensor("mask_meta", key_mask, ndim=2)
    if key_mask.device != q.device:
        fail("mask_meta", f"key_mask is on {key_mask.device} but q is on {q.device}")
    if tuple(key_mask.shape) != (k.shape[0], k.shape[1]):
        fail("mask_meta", f"key_mask shape {tuple(key_mask.shape)} does not match k's [batch, seq] {tuple(k.shape[:2])}")
    if key_mask.dtype != torch.bool and not key_mask.dtype.is_floating_point:
        fail("mask_meta", f"key_mask must be bool or float (build_mask_meta converts ints), got {key_mask.dtype}")
    check_scale(softmax_scale)
