"""``mla_v_up_proj`` over aiter's kernels: the original path and the strided-output path (sglang #25463).

Both paths launch the same kernels on the same inputs; they differ only in where the GEMM writes:

- original: ``y`` is a contiguous ``(heads, batch, v_dim)`` tensor, so o_proj's ``(batch, heads * v_dim)``
  input is a copy (``y.transpose(0, 1).flatten(1, 2)``), or a fused flatten-quant reading ``y`` strided;
- strided: the GEMM writes through ``buf.transpose(0, 1)`` of a contiguous ``(batch, heads, v_dim)``
  ``buf``, so the flatten is a view and the fused quants read contiguous rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from attn_dispatch.checks import check_tensor, fail
from attn_dispatch.validate import validate_mla_v_up_proj

from .kernels import Kernels

ACTIVATION_DTYPES = (torch.bfloat16, torch.float16)  # what aiter's a16wfp4 GEMM takes
MXFP4_BLOCK = 32  # elements per E8M0 scale
FP8_GROUP = 128  # o_proj's fp8 input is quantized in groups of 128, as its block-scaled GEMM expects

VUpProj = Callable[..., "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]


def make_v_up_proj(kernels: Kernels, *, strided_output: bool = True) -> VUpProj:
    """The ``mla_v_up_proj`` op (signature of ``attn_dispatch.reference.mla_v_up_proj``) over ``kernels``.

    ``strided_output=False`` gives the original path, kept to prove the optimized one byte-identical.
    """

    def mla_v_up_proj_strided(
        attn_output: torch.Tensor,
        w_vc: torch.Tensor,
        *,
        w_vc_scale: torch.Tensor | None = None,
        o_proj_weight_dtype: torch.dtype = torch.bfloat16,
    ):
        batch, heads, v_dim = check_v_up_proj_args(attn_output, w_vc, w_vc_scale, o_proj_weight_dtype)
        buf = torch.empty((batch, heads, v_dim), dtype=attn_output.dtype, device=attn_output.device)
        _gemm_into(kernels, attn_output.transpose(0, 1), w_vc, w_vc_scale, y=buf.transpose(0, 1))
        return _o_proj_input(kernels, buf, o_proj_weight_dtype)

    def mla_v_up_proj_original(
        attn_output: torch.Tensor,
        w_vc: torch.Tensor,
        *,
        w_vc_scale: torch.Tensor | None = None,
        o_proj_weight_dtype: torch.dtype = torch.bfloat16,
    ):
        batch, heads, v_dim = check_v_up_proj_args(attn_output, w_vc, w_vc_scale, o_proj_weight_dtype)
        y = torch.empty((heads, batch, v_dim), dtype=attn_output.dtype, device=attn_output.device)
        _gemm_into(kernels, attn_output.transpose(0, 1), w_vc, w_vc_scale, y=y)
        return _o_proj_input(kernels, y.transpose(0, 1), o_proj_weight_dtype)

    return mla_v_up_proj_strided if strided_output else mla_v_up_proj_original


def _gemm_into(
    kernels: Kernels, x: torch.Tensor, w_vc: torch.Tensor, w_vc_scale: torch.Tensor | None, *, y: torch.Tensor
) -> None:
    """``y[h] = x[h] @ W[h]`` for ``x`` ``(heads, batch, kv_lora_rank)``, written through ``y``'s strides."""
    if w_vc_scale is None and torch.compiler.is_compiling():
        y.copy_(torch.bmm(x, w_vc))  # Dynamo cannot trace out= into a non-contiguous tensor
    elif w_vc_scale is None:
        torch.bmm(x, w_vc, out=y)  # cuBLAS/hipBLASLt write with y's leading dimension: no temporary
    else:
        kernels.batched_gemm_fp4(x, w_vc, w_vc_scale, y.dtype, y)


def _o_proj_input(kernels: Kernels, bhv: torch.Tensor, o_proj_weight_dtype: torch.dtype):
    """o_proj's input from the ``(batch, heads, v_dim)`` GEMM result, by o_proj's weight dtype."""
    if o_proj_weight_dtype == torch.uint8:
        return kernels.fused_flatten_mxfp4_quant(bhv)
    if o_proj_weight_dtype == torch.float8_e4m3fn:
        return kernels.fused_flatten_fp8_group_quant(bhv, group_size=FP8_GROUP, dtype_quant=torch.float8_e4m3fn)
    return bhv.flatten(1, 2)  # a view when bhv is contiguous; a copy for the original's transposed y


def check_v_up_proj_args(
    attn_output: torch.Tensor,
    w_vc: torch.Tensor,
    w_vc_scale: torch.Tensor | None,
    o_proj_weight_dtype: torch.dtype,
) -> tuple[int, int, int]:
    """The op's rules (``validate_mla_v_up_proj``, shared with the original path), then what aiter's
    kernels add; metadata only. Returns ``(batch, heads, v_dim)``."""
    batch, heads, v_dim = validate_mla_v_up_proj(attn_output, w_vc, w_vc_scale, o_proj_weight_dtype)
    if w_vc.dtype == torch.uint8:
        check_tensor("attn_output", attn_output, dtype=ACTIVATION_DTYPES)
    # aiter's fused flatten-quants process one head's v_dim per program in a power-of-two block.
    smallest = {torch.uint8: MXFP4_BLOCK, torch.float8_e4m3fn: FP8_GROUP}.get(o_proj_weight_dtype)
    if smallest is not None and (v_dim < smallest or v_dim & (v_dim - 1)):
        fail("w_vc", f"v_dim {v_dim} must be a power of two >= {smallest} for a {o_proj_weight_dtype} o_proj")
    return batch, heads, v_dim
