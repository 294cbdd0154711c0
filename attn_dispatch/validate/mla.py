"""Rules of the MLA ops: ``mla_v_up_proj``, ``mla_query_for_backend`` and ``mla_decode_query``."""

from __future__ import annotations

import numbers

import torch

from ..checks import FLOAT_DTYPES, check_instance, check_int, check_tensor, fail

MXFP4_BLOCK = 32  # elements per E8M0 scale of an MXFP4 w_vc


def validate_mla_v_up_proj(
    attn_output: torch.Tensor,
    w_vc: torch.Tensor,
    w_vc_scale: torch.Tensor | None = None,
    o_proj_weight_dtype: torch.dtype = torch.bfloat16,
) -> tuple[int, int, int]:
    """Rules of ``mla_v_up_proj`` in both weight forms; returns ``(batch, heads, v_dim)``.

    Float ``w_vc`` ``(heads, kv_lora_rank, v_dim)`` in ``attn_output``'s dtype, no scale; or MXFP4 ``w_vc``
    uint8 ``(heads, v_dim, kv_lora_rank // 2)`` with uint8 E8M0 ``w_vc_scale`` ``(heads, v_dim,
    kv_lora_rank // 32)``. Which forms an implementation can run is its own business (the portable path
    runs float only); the layouts are the op's.
    """
    check_tensor("attn_output", attn_output, ndim=3, dtype=FLOAT_DTYPES)
    batch, heads, rank = attn_output.shape
    device = attn_output.device
    check_tensor("w_vc", w_vc, ndim=3, device=device)
    if w_vc.dtype == torch.uint8:
        if w_vc_scale is None:
            fail("w_vc_scale", "required with MXFP4 (uint8) w_vc")
        if rank % MXFP4_BLOCK:
            fail("attn_output", f"kv_lora_rank {rank} must be a multiple of {MXFP4_BLOCK} for MXFP4 w_vc")
        v_dim = w_vc.shape[1]
        if tuple(w_vc.shape) != (heads, v_dim, rank // 2):
            fail("w_vc", f"expected MXFP4 shape ({heads}, v_dim, {rank // 2}), got {tuple(w_vc.shape)}")
        check_tensor("w_vc_scale", w_vc_scale, ndim=3, dtype=torch.uint8, device=device)
        if tuple(w_vc_scale.shape) != (heads, v_dim, rank // MXFP4_BLOCK):
            fail("w_vc_scale", f"expected shape ({heads}, {v_dim}, {rank // MXFP4_BLOCK}), got {tuple(w_vc_scale.shape)}")
    else:
        if w_vc_scale is not None:
            fail("w_vc_scale", f"given, but w_vc is {w_vc.dtype}, not MXFP4 uint8")
        if w_vc.dtype != attn_output.dtype:
            fail("w_vc", f"dtype {w_vc.dtype} differs from attn_output's {attn_output.dtype}")
        v_dim = w_vc.shape[2]
        if tuple(w_vc.shape[:2]) != (heads, rank):
            fail("w_vc", f"expected shape ({heads}, {rank}, v_dim), got {tuple(w_vc.shape)}")
    if not isinstance(o_proj_weight_dtype, torch.dtype):
        fail("o_proj_weight_dtype", f"expected a torch.dtype, got {type(o_proj_weight_dtype).__name__} {o_proj_weight_dtype!r}")
    return batch, heads, v_dim


def validate_mla_query_for_backend(
    q: torch.Tensor,
    q_rope: torch.Tensor | None,
    is_decode: bool,
    decode_impl: str,
    kv_lora_rank: int | None = None,
    llama_4_scaling: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rules of ``mla_query_for_backend``; returns ``(q_nope, q_rope)`` (views of ``q`` when it is ``q_cat``)."""
    _check_query("q", q, ndim=3)
    check_instance("is_decode", is_decode, bool)
    check_instance("decode_impl", decode_impl, str)
    if q_rope is None:
        if isinstance(kv_lora_rank, bool) or not isinstance(kv_lora_rank, int) or not 0 < kv_lora_rank < q.shape[-1]:
            fail("kv_lora_rank", f"with q_rope=None it must be an int in (0, {q.shape[-1]}), got {kv_lora_rank!r}")
        q_nope, q_rope = q[..., :kv_lora_rank], q[..., kv_lora_rank:]
    else:
        q_nope = q
        check_tensor("q_rope", q_rope, ndim=3, dtype=q.dtype, device=q.device)
        if q_rope.shape[:2] != q.shape[:2] or q_rope.shape[2] == 0:
            fail("q_rope", f"shape {tuple(q_rope.shape)} does not match q {tuple(q.shape)} in tokens and heads")
        if kv_lora_rank is not None and kv_lora_rank != q.shape[-1]:
            fail("q", f"with q_rope given q is q_nope, whose head dim {q.shape[-1]} differs from kv_lora_rank={kv_lora_rank}")
    if llama_4_scaling is not None and not isinstance(llama_4_scaling, (numbers.Real, torch.Tensor)):
        fail("llama_4_scaling", f"expected None, a float or a tensor, got {type(llama_4_scaling).__name__}")
    return q_nope, q_rope


def validate_mla_decode_query(
    q: torch.Tensor,
    q_rope: torch.Tensor | None,
    num_heads: int,
    kv_lora_rank: int,
    decode_impl: str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rules of ``mla_decode_query``; returns ``q`` and ``q_rope`` as ``(tokens, heads, d)`` views.

    ``q_rope`` given: ``q`` is ``q_nope``, ``(tokens, num_heads, kv_lora_rank)`` or flattened
    ``(tokens, num_heads * kv_lora_rank)``; ``q_rope`` ``(tokens, num_heads, rope_dim)`` or flattened.
    ``q_rope`` None: ``q`` is the concatenated query, ``(tokens, num_heads, kv_lora_rank + rope_dim)`` or
    flattened, with ``rope_dim > 0``; the second result is None. Nothing is reshaped to fit: a tensor
    whose heads or widths disagree with ``num_heads``/``kv_lora_rank`` is refused.
    """
    check_int("num_heads", num_heads)
    check_int("kv_lora_rank", kv_lora_rank)
    check_instance("decode_impl", decode_impl, str)
    _check_query("q", q, ndim=(2, 3))
    q3 = _per_head("q", q, num_heads)
    if q_rope is None:
        if q3.shape[-1] <= kv_lora_rank:
            fail("kv_lora_rank", f"{kv_lora_rank} leaves no rope part of the concatenated query's head dim {q3.shape[-1]}")
        return q3, None
    if q3.shape[-1] != kv_lora_rank:
        fail("q", f"shape {tuple(q.shape)}: with q_rope given q is q_nope, head dim kv_lora_rank={kv_lora_rank}, got {q3.shape[-1]}")
    check_tensor("q_rope", q_rope, ndim=(2, 3), dtype=q.dtype, device=q.device)
    rope3 = _per_head("q_rope", q_rope, num_heads)
    if rope3.shape[0] != q3.shape[0] or rope3.shape[-1] == 0:
        fail("q_rope", f"shape {tuple(q_rope.shape)} does not match q's {q3.shape[0]} tokens with a rope dim > 0")
    return q3, rope3


def _check_query(name: str, q: object, *, ndim) -> None:
    check_tensor(name, q, ndim=ndim)
    if not q.is_floating_point():
        fail(name, f"expected a floating-point query, got {q.dtype}")


def _per_head(name: str, t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``t`` as ``(tokens, num_heads, d)``: itself when 3-D with ``num_heads`` heads, a view when 2-D."""
    if t.dim() == 3:
        if t.shape[1] != num_heads:
            fail(name, f"shape {tuple(t.shape)} has {t.shape[1]} heads, expected num_heads={num_heads}")
        return t
    if t.shape[1] % num_heads or t.shape[1] == 0:
        fail(name, f"shape {tuple(t.shape)}: width {t.shape[1]} does not split into num_heads={num_heads} heads")
    return t.unflatten(1, (num_heads, t.shape[1] // num_heads))
