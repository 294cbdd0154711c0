"""Original paths for two MLA steps around attention (seed PRs sglang #25463 and seed 004).

``mla_v_up_proj``: the value up-projection. The GEMM fills a contiguous ``(heads, batch, v_dim)`` tensor,
then ``transpose(0, 1).flatten(1, 2)`` copies it into o_proj's ``(batch, heads * v_dim)`` input.

``mla_query_for_backend`` / ``mla_decode_query``: the two sides of the decode query hand-off. The model
passes the split ``q_nope`` (absorbed, ``kv_lora_rank`` wide) and ``q_rope``, even when it holds them as
slices of one concatenated ``q_cat``; the backend concatenates them (again) into the
``(tokens, heads, kv_lora_rank + rope_dim)`` query its kernel reads.
"""

from __future__ import annotations

import torch

from ..checks import check_tensor, fail

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def mla_v_up_proj(
    attn_output: torch.Tensor,
    w_vc: torch.Tensor,
    *,
    w_vc_scale: torch.Tensor | None = None,
    o_proj_weight_dtype: torch.dtype = torch.bfloat16,
):
    """``attn_output`` ``(batch, heads, kv_lora_rank)`` x ``w_vc`` -> o_proj input ``(batch, heads * v_dim)``.

    ``w_vc`` is ``(heads, kv_lora_rank, v_dim)`` in attn_output's float dtype. MXFP4 weights (uint8
    ``(heads, v_dim, kv_lora_rank // 2)``, two e2m1 per byte, with E8M0 ``w_vc_scale``
    ``(heads, v_dim, kv_lora_rank // 32)``) and quantized o_proj inputs (``o_proj_weight_dtype`` uint8:
    MXFP4, or float8_e4m3fn: fp8 in groups of 128) need aiter's kernels and are served by the
    ``rocm_mxfp4`` plugin; asking the portable path for them is an error. When the o_proj input is
    quantized, implementations return ``(values, scales)``.
    """
    check_tensor("attn_output", attn_output, ndim=3, dtype=FLOAT_DTYPES)
    check_tensor("w_vc", w_vc, ndim=3, device=attn_output.device)
    if w_vc.dtype == torch.uint8 or w_vc_scale is not None:
        fail("w_vc", "MXFP4 weights need aiter's batched GEMM: enable the rocm_mxfp4 plugin on gfx950")
    if w_vc.dtype != attn_output.dtype:
        fail("w_vc", f"dtype {w_vc.dtype} differs from attn_output's {attn_output.dtype}")
    if o_proj_weight_dtype in (torch.uint8, torch.float8_e4m3fn):
        fail("o_proj_weight_dtype", f"{o_proj_weight_dtype} o_proj inputs need aiter's fused flatten-quant (rocm_mxfp4)")
    batch, heads, rank = attn_output.shape
    if w_vc.shape[0] != heads or w_vc.shape[1] != rank:
        fail("w_vc", f"expected shape ({heads}, {rank}, v_dim) for attn_output {tuple(attn_output.shape)}, got {tuple(w_vc.shape)}")
    y = torch.bmm(attn_output.transpose(0, 1), w_vc)  # (heads, batch, v_dim), contiguous
    return y.transpose(0, 1).flatten(1, 2)  # a copy: the flatten of a transposed tensor


def mla_query_for_backend(
    q: torch.Tensor,
    q_rope: torch.Tensor | None,
    *,
    is_decode: bool,
    decode_impl: str,
    kv_lora_rank: int | None = None,
    llama_4_scaling: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Model side: what to pass the attention backend as ``(q, q_rope)``.

    Either ``q`` is ``q_nope`` ``(tokens, heads, kv_lora_rank)`` and ``q_rope`` ``(tokens, heads,
    rope_dim)``, or ``q_rope`` is None and ``q`` is the model's concatenated ``q_cat`` ``(tokens, heads,
    kv_lora_rank + rope_dim)`` (``kv_lora_rank`` then says where to split it). The original path always
    passes the split form (views of ``q_cat`` when given one); ``llama_4_scaling`` (decode only) scales
    the nope part in place. Optimized implementations may return ``(q_cat, None)`` for backends that
    take a concatenated query.
    """
    check_tensor("q", q, ndim=3)
    if q_rope is None:
        if not isinstance(kv_lora_rank, int) or not 0 < kv_lora_rank < q.shape[-1]:
            fail("kv_lora_rank", f"with q_rope=None it must be an int in (0, {q.shape[-1]}), got {kv_lora_rank!r}")
        q_nope, q_rope = q[..., :kv_lora_rank], q[..., kv_lora_rank:]
    else:
        q_nope = q
        check_tensor("q_rope", q_rope, ndim=3, dtype=q.dtype, device=q.device)
        if q_rope.shape[:2] != q_nope.shape[:2]:
            fail("q_rope", f"shape {tuple(q_rope.shape)} does not match q {tuple(q_nope.shape)} in tokens and heads")
    if is_decode and llama_4_scaling is not None:
        q_nope.mul_(llama_4_scaling)
    return q_nope, q_rope


def mla_decode_query(
    q: torch.Tensor,
    q_rope: torch.Tensor | None,
    *,
    num_heads: int,
    kv_lora_rank: int,
    decode_impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backend side: ``(q_all, q_nope, q_rope)`` with ``q_all`` ``(tokens, heads, kv_lora_rank + rope_dim)``.

    With ``q_rope`` given, ``q`` holds the nope part. With ``q_rope=None``, ``q`` is the model's
    concatenated query, split into views. Either way the original decode path concatenates the two parts
    into the one query tensor its kernel reads (for a concatenated input: a copy of the same bytes).
    """
    check_tensor("q", q, ndim=(2, 3))
    if q_rope is None:
        q_cat = concatenated_query_view(q, num_heads=num_heads, kv_lora_rank=kv_lora_rank)
        q_nope, q_pe = q_cat[..., :kv_lora_rank], q_cat[..., kv_lora_rank:]
    else:
        check_tensor("q_rope", q_rope, ndim=(2, 3), dtype=q.dtype, device=q.device)
        q_nope = q.view(-1, num_heads, kv_lora_rank)
        q_pe = q_rope.view(q_nope.shape[0], num_heads, -1)
    q_all = torch.cat([q_nope, q_pe], dim=-1)
    return q_all, q_all[..., :kv_lora_rank], q_all[..., kv_lora_rank:]


def concatenated_query_view(q: torch.Tensor, *, num_heads: int, kv_lora_rank: int) -> torch.Tensor:
    """``q_cat`` (``(tokens, heads * d)`` or ``(tokens, heads, d)``) as ``(tokens, heads, d)``, checked.

    ``contiguous()`` is a no-op for the model's own ``q_cat``; the result is a view of it.
    """
    check_tensor("q", q, ndim=(2, 3))
    if q.shape[-1] * (q.shape[1] if q.dim() == 3 else 1) % num_heads:
        fail("q", f"shape {tuple(q.shape)} does not split into {num_heads} heads")
    q_cat = q.contiguous().view(q.shape[0], num_heads, -1)
    if not 0 < kv_lora_rank < q_cat.shape[-1]:
        fail("kv_lora_rank", f"must be in (0, {q_cat.shape[-1]}) for a concatenated head dim of {q_cat.shape[-1]}")
    return q_cat
