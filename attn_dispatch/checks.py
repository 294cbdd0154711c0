"""Argument-check primitives shared by the validators (``attn_dispatch.validate``) and the plugins.

Every check runs on shapes, dtypes, devices and host values only (no device sync) and raises a
``ValueError`` whose message starts with the argument's name, before any kernel writes anything.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import NoReturn

import torch

INDEX_DTYPE = torch.int32  # cu_seqlens, cache_seqlens, page tables
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what op contracts allow; kernels may take fewer


def fail(arg: str, message: str) -> NoReturn:
    raise ValueError(f"{arg}: {message}")


def check_tensor(
    arg: str,
    t: object,
    *,
    ndim: int | Iterable[int] | None = None,
    dtype: torch.dtype | Iterable[torch.dtype] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        fail(arg, f"expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            fail(arg, f"expected {' or '.join(map(str, allowed))} dims, got shape {tuple(t.shape)}")
    if dtype is not None:
        allowed_dtypes = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
        if t.dtype not in allowed_dtypes:
            fail(arg, f"expected dtype {' or '.join(map(str, allowed_dtypes))}, got {t.dtype}")
    if device is not None and t.device != device:
        fail(arg, f"expected device {device}, got {t.device}")
    return t


def check_last_dim_contiguous(arg: str, t: torch.Tensor) -> None:
    """Kernels (FlashAttention) read rows with unit stride in the last dim."""
    if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        fail(arg, f"must be contiguous in its last dim (strides {t.stride()})")


def check_int(arg: str, value: object, *, minimum: int = 1) -> int:
    """A host int (a Python or numpy int, or a SymInt under torch.compile; not a bool, and not a tensor,
    whose value would need a device sync) that is at least ``minimum``."""
    if type(value) is not int and (isinstance(value, bool) or not isinstance(value, (numbers.Integral, torch.SymInt))):
        fail(arg, f"expected an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        fail(arg, f"must be {'positive' if minimum == 1 else f'>= {minimum}'}, got {value}")
    return value


def check_dtype_arg(arg: str, value: object, allowed: Iterable[torch.dtype]) -> torch.dtype:
    """A ``torch.dtype`` argument (``"bf16"`` as a string is refused, not guessed)."""
    allowed = tuple(allowed)
    if not isinstance(value, torch.dtype):
        fail(arg, f"expected a torch.dtype such as torch.bfloat16, got {type(value).__name__} {value!r}")
    if value not in allowed:
        fail(arg, f"expected {' or '.join(map(str, allowed))}, got {value}")
    return value


def check_instance(arg: str, value: object, cls: type, hint: str = "") -> None:
    if not isinstance(value, cls):
        fail(arg, f"expected {cls.__name__}{hint}, got {type(value).__name__}")


def check_scale(value: object) -> None:
    """``softmax_scale``: None (1/sqrt(head_dim)) or a real number."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        fail("softmax_scale", f"expected None or a float, got {type(value).__name__}")


def out_rows_view(out: torch.Tensor, tokens: int, heads: int, head_dim: int, like: torch.Tensor) -> torch.Tensor:
    """Check the engine's output buffer and return its first ``tokens`` rows as ``[tokens, heads, head_dim]``.

    ``out`` is ``[rows, heads * head_dim]`` or ``[rows, heads, head_dim]`` with ``rows >= tokens`` (CUDA-graph
    batches are padded), contiguous, with the dtype and device of ``like`` (the query).
    """
    check_tensor("out", out, ndim=(2, 3), dtype=like.dtype, device=like.device)
    expected_tail = (heads * head_dim,) if out.dim() == 2 else (heads, head_dim)
    if tuple(out.shape[1:]) != expected_tail or out.shape[0] < tokens:
        fail("out", f"expected shape [>={tokens}, {', '.join(map(str, expected_tail))}], got {tuple(out.shape)}")
    if not out.is_contiguous():
        fail("out", f"must be contiguous (strides {out.stride()}); kernels write it row-major")
    return out[:tokens].view(tokens, heads, head_dim)
