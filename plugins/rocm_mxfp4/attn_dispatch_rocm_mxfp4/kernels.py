"""The aiter kernels the v-up projection launches, found once at registration.

This is the plugin's kernel-provider seam: :func:`aiter_kernels` builds a :class:`Kernels` from the
installed aiter, and tests build one from CPU stand-ins that implement the same documented contract.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from attn_dispatch import MissingDependency

log = logging.getLogger("attn_dispatch")

# aiter keeps these old flat module names working after moving the files under gemm/ and quant/.
A16WFP4_MODULE = "aiter.ops.triton.batched_gemm_a16wfp4"
PRE_QUANT_MODULE = "aiter.ops.triton.batched_gemm_afp4wfp4_pre_quant"
MXFP4_QUANT_MODULE = "aiter.ops.triton.fused_mxfp4_quant"
FP8_QUANT_MODULE = "aiter.ops.triton.fused_fp8_quant"


@dataclass(frozen=True)
class Kernels:
    """Callables with aiter's signatures; the op never looks anything up per call.

    ``batched_gemm_fp4(x, w, w_scales, dtype, y)``: ``y[i] = x[i] @ dequant(w[i], w_scales[i]).T`` with
    ``x`` ``(B, M, K)`` bf16/fp16 (quantized to MXFP4 inside the kernel), ``w`` ``(B, N, K // 2)`` uint8,
    ``w_scales`` ``(B, N, K // 32)`` E8M0 uint8, and ``y`` ``(B, M, N)`` written through its own strides.

    ``fused_flatten_mxfp4_quant(x)`` and ``fused_flatten_fp8_group_quant(x, group_size=, dtype_quant=)``
    flatten ``x`` ``(M, N1, N2)`` (any strides) to ``(M, N1 * N2)`` and quantize it: ``(values, scales)``.
    """

    batched_gemm_fp4: Callable[..., torch.Tensor]
    fused_flatten_mxfp4_quant: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    fused_flatten_fp8_group_quant: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    provider: str = "aiter"


def aiter_kernels() -> Kernels:
    """Import aiter's kernels, or raise :class:`MissingDependency` saying what is missing."""
    try:
        importlib.import_module("aiter")
    except ImportError as exc:
        raise MissingDependency("aiter not installed") from exc
    try:
        importlib.import_module("aiter.ops.triton")
    except ImportError as exc:
        # PyPI's "aiter" is an unrelated package; ROCm aiter is amd-aiter from AMD's index or source.
        raise MissingDependency("aiter not installed (the importable 'aiter' has no aiter.ops.triton)") from exc

    # batched_gemm_afp4wfp4_pre_quant is now a deprecated wrapper of batched_gemm_a16wfp4(prequant=True);
    # both take (x, w, w_scales, dtype, y) first, so whichever exists is called the same way.
    try:
        gemm = importlib.import_module(A16WFP4_MODULE).batched_gemm_a16wfp4
        gemm_name = "batched_gemm_a16wfp4"
    except (ImportError, AttributeError):
        gemm = _import(PRE_QUANT_MODULE, "batched_gemm_afp4wfp4_pre_quant")
        gemm_name = "batched_gemm_afp4wfp4_pre_quant"
    kernels = Kernels(
        batched_gemm_fp4=gemm,
        fused_flatten_mxfp4_quant=_import(MXFP4_QUANT_MODULE, "fused_flatten_mxfp4_quant"),
        fused_flatten_fp8_group_quant=_import(FP8_QUANT_MODULE, "fused_flatten_fp8_group_quant"),
        provider=f"aiter {gemm_name}",
    )
    log.info("rocm_mxfp4: using %s", kernels.provider)
    return kernels


def _import(module: str, name: str) -> Callable:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise MissingDependency(f"aiter has no {module}.{name}: too old an aiter? ({exc})") from exc
