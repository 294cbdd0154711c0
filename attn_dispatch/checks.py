"""Input checks shared by the references and the plugins.

Every check runs on shapes, dtypes and devices only (host metadata, no device sync) and raises a
``ValueError`` that names the argument, before any kernel writes anything.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def fail(arg: str, message: str) -> None:
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
