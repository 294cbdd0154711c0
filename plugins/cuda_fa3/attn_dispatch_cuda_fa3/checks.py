"""The checks of the ``attention_out`` ops: a cheap test per call, the op's validator when it fails.

Per call only what FA3 cannot check runs in Python (:func:`fits_plan`, :func:`fits_kernel`): that the layer
matches the plan its metadata was made for (FA3 checks only the metadata's length, so a mismatch
misschedules without a word, and it launches on q's GPU, so q must be on the plan's), that ``out`` is
contiguous (its rows are viewed as ``[tokens, heads, head_dim_v]``) with q's dtype (FA3 never sees ``out``
when it cannot write into it, and a ``copy_`` would convert silently), and that the max lengths are
positive. Dtypes, shapes, strides and "is on a GPU" are FA3's own host checks, made before it launches
anything. When the cheap test fails, or the kernel call raises, the detailed checks run: the host's op
validators (``attn_dispatch.validate``, the contract the reference enforces too) plus this plugin's own
rules (the plan is this plugin's, FA3 runs fp16/bf16), and they raise the ValueError naming the argument,
chained to the kernel's error; nothing has been written. Like FA3, the per-call test does not compare the
GPUs of k, v and out with q's (a few hundred ns per layer); the detailed checks do.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from attn_dispatch.plans import AttentionParams
from attn_dispatch.validate import validate_paged_attention_out, validate_varlen_attention_out

from .plan import FLASH_DTYPES, FlashPlan, check_plan_is_ours


def fits_plan(q, k_cache, v_cache, out, plan: FlashPlan) -> bool:
    """The per-call test of a paged layer (``plan`` is known to be this plugin's)."""
    try:
        return (
            q.dtype == plan.dtype and q.shape[1:] == plan.q_tail and q.get_device() == plan.device_index
            and k_cache.shape[1:] == plan.k_cache_tail and v_cache.shape[1:] == plan.v_cache_tail
            and out.dtype == plan.dtype and out.is_contiguous()
        )  # fmt: skip
    except (AttributeError, TypeError):  # not a tensor: the detailed check says which
        return False


def fits_kernel(q, out, max_seqlen_q, max_seqlen_k) -> bool:
    """The per-call test of a varlen call."""
    try:
        return out.dtype == q.dtype and out.is_contiguous() and max_seqlen_q > 0 and max_seqlen_k > 0
    except (AttributeError, TypeError):
        return False


def check_paged(
    q, k_cache, v_cache, out, plan, params: AttentionParams, softmax_scale: float | None, provider_name: str
) -> torch.Tensor:
    """``paged_attention_out``'s rules for this plugin; returns ``out``'s rows view."""
    check_plan_is_ours(plan, provider_name)
    return validate_paged_attention_out(q, k_cache, v_cache, out, plan, params, softmax_scale)


def check_varlen(
    q, k, v, out, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, params: AttentionParams, softmax_scale
) -> torch.Tensor:
    """``varlen_attention_out``'s rules for FlashAttention (fp16/bf16); returns ``out``'s rows view."""
    return validate_varlen_attention_out(
        q, k, v, out, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, params, softmax_scale, dtypes=FLASH_DTYPES
    )  # fmt: skip


def name_the_argument(exc: Exception, detailed_check: Callable, *args) -> None:
    """Raise the detailed check's ValueError (naming the argument) in place of the kernel's ``exc``, if it
    finds one; otherwise return, and the caller re-raises ``exc`` unchanged."""
    try:
        detailed_check(*args)
    except ValueError as named:
        raise named from exc
