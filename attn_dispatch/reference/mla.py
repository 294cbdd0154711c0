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

from ..checks import fail
from ..validate import validate_mla_decode_query, validate_mla_query_for_backend, validate_mla_v_up_proj


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
    validate_mla_v_up_proj(attn_output, w_vc, w_vc_scale, o_proj_weight_dtype)
    # Valid forms this portable path cannot run (the op allows them; aiter's kernels run them):
    if w_vc.dtype == torch.uint8:
        fail("w_vc", "MXFP4 weights need aiter's batched GEMM: enable the rocm_mxfp4 plugin on gfx950")
    if o_proj_weight_dtype in (torch.uint8, torch.float8_e4m3fn):
        fail("o_proj_weight_dtype", f"{o_proj_weight_dtype} o_proj inputs need aiter's fused flatten-quant (rocm_mxfp4)")
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
    q_nope, q_rope = validate_mla_query_for_backend(q, q_rope, is_decode, decode_impl, kv_lora_rank, llama_4_scaling)
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
    concatenated query, split into views. Each may be ``(tokens, heads, d)`` or flattened ``(tokens,
    heads * d)``; heads and widths must agree with ``num_heads``/``kv_lora_rank`` (nothing is reshaped
    to fit: :func:`attn_dispatch.validate.validate_mla_decode_query`). Either way the original decode
    path concatenates the two parts into the one query tensor its kernel reads (for a concatenated
    input: a copy of the same bytes).
    """
    q, q_rope = validate_mla_decode_query(q, q_rope, num_heads, kv_lora_rank, decode_impl)
    if q_rope is None:  # the model's concatenated query: split it into views ...
        q_nope, q_pe = q[..., :kv_lora_rank], q[..., kv_lora_rank:]
    else:
        q_nope, q_pe = q, q_rope
    q_all = torch.cat([q_nope, q_pe], dim=-1)  # ... and concatenate them (again)
    return q_all, q_all[..., :kv_lora_rank], q_all[..., kv_lora_rank:]
