"""Fused Triton row movers for varlen attention: gather the valid tokens of padded tensors, and scatter
packed tokens back to padded.

Shared by every client that unpads for varlen FlashAttention: the ``varlen_diffusion`` plugin (masked
diffusion attention) and attn_dispatch's transformers integration (left-padded batches, through
``attn_dispatch.integrations.unpad``). Most callers want the launches bound once per shape in
:mod:`.rows_launch`. Importing this module imports Triton (the ``rows`` extra); the package's
``__init__`` does not import it.

Both work on "rows": one token's ``heads x head_dim`` features of a ``[B, S, H, D]`` tensor, addressed by
its flat position ``b * S + s``. They are plain copies, so they are bit-exact against torch:

- :func:`gather_rows` ``== torch.stack([x.reshape(B * S, H, D).index_select(0, indices) for x in xs])``
- :func:`scatter_rows` ``== torch.zeros(B * S, H, D).index_copy_(0, indices, packed)`` (as ``[B, S, H, D]``)

Sources may have any strides (a slice of a fused QKV projection, say); outputs are contiguous. Zero rows
launch nothing. On CPU the kernels run only under ``TRITON_INTERPRET=1`` (tests); on the GPU each launch
is asynchronous and CUDA-graph capturable (no host syncs).

Each program moves ``BLOCK_ROWS`` rows of one head (``BLOCK_ROWS x head_dim`` elements). The gather
moves the same rows of up to three sources (Q, K, V) in one program, so the row indices and offsets are
loaded and computed once for all of them. The grid is 1-D; with ``heads_inner`` (the default) consecutive
programs take the heads of one block of rows, so together they stream whole rows (``H x D`` contiguous
elements) instead of ``D``-element pieces a row apart.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

BLOCK_ROWS = 32
NUM_WARPS = 4
HEADS_INNER = True


@triton.jit
def _block_and_head(HEADS: tl.constexpr, HEADS_INNER: tl.constexpr, n_blocks):
    pid = tl.program_id(0)
    if HEADS_INNER:
        return pid // HEADS, pid % HEADS
    return pid % n_blocks, pid // n_blocks


@triton.jit
def _gather_rows_kernel(
    src0, src1, src2, dst, indices,
    n_rows, plane, seqlen,
    stride_b, stride_s, stride_h, stride_d,
    NUM_SRC: tl.constexpr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_ROWS: tl.constexpr, HEADS_INNER: tl.constexpr,
):  # fmt: skip
    """dst[t, i, head, :] = src_t[b, s, head, :] with b * seqlen + s = indices[i], for t < NUM_SRC.

    ``plane`` is the element count of one source's packed rows in ``dst`` (computed on the host, so it
    is an int64 argument when it needs to be).
    """
    block, head = _block_and_head(HEADS, HEADS_INNER, tl.cdiv(n_rows, BLOCK_ROWS))
    rows = block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < n_rows
    flat = tl.load(indices + rows, mask=row_ok, other=0).to(tl.int64)
    b = flat // seqlen
    s = flat - b * seqlen
    d = tl.arange(0, BLOCK_D)
    if BLOCK_D == HEAD_DIM:
        mask = row_ok[:, None]  # constant along d, so loads stay 16-byte vectors
    else:
        mask = row_ok[:, None] & (d < HEAD_DIM)[None, :]
    src_off = (b * stride_b + s * stride_s + head * stride_h)[:, None] + d[None, :] * stride_d
    dst_off = (rows.to(tl.int64) * (HEADS * HEAD_DIM) + head * HEAD_DIM)[:, None] + d[None, :]
    # Sources are read once: evict_first keeps them from pushing the packed output out of L2.
    tl.store(dst + dst_off, tl.load(src0 + src_off, mask=mask, eviction_policy="evict_first"), mask=mask)
    if NUM_SRC > 1:
        tl.store(dst + plane + dst_off, tl.load(src1 + src_off, mask=mask, eviction_policy="evict_first"), mask=mask)
    if NUM_SRC > 2:
        tl.store(dst + 2 * plane + dst_off, tl.load(src2 + src_off, mask=mask, eviction_policy="evict_first"), mask=mask)  # fmt: skip


@triton.jit
def _scatter_rows_kernel(
    src, dst, inverse,
    n_dst_rows,
    stride_row, stride_h, stride_d,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_ROWS: tl.constexpr,
    HEADS_INNER: tl.constexpr,
):  # fmt: skip
    """dst[r, head, :] = src[inverse[r], head, :] where inverse[r] >= 0, else zeros; every dst row written."""
    block, head = _block_and_head(HEADS, HEADS_INNER, tl.cdiv(n_dst_rows, BLOCK_ROWS))
    rows = block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < n_dst_rows
    packed = tl.load(inverse + rows, mask=row_ok, other=-1)
    valid = packed >= 0
    packed = tl.where(valid, packed, 0).to(tl.int64)  # keep masked-off addresses in range
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    src_off = (packed * stride_row + head * stride_h)[:, None] + d[None, :] * stride_d
    values = tl.load(src + src_off, mask=valid[:, None] & d_ok[None, :], other=0.0, eviction_policy="evict_first")
    dst_off = (rows.to(tl.int64) * (HEADS * HEAD_DIM) + head * HEAD_DIM)[:, None] + d[None, :]
    tl.store(dst + dst_off, values, mask=row_ok[:, None] & d_ok[None, :])


def gather_rows(
    sources: Sequence[torch.Tensor],
    indices: torch.Tensor,
    *,
    block_rows: int = BLOCK_ROWS,
    num_warps: int = NUM_WARPS,
    heads_inner: bool = HEADS_INNER,
) -> torch.Tensor:
    """Gather the rows ``indices`` (flat ``b * S + s``) of 1-3 same-shaped ``[B, S, H, D]`` tensors.

    Returns a contiguous ``[len(sources), n, H, D]`` tensor; ``out[t]`` is source ``t``'s packed rows.
    One launch when the sources share strides (the usual case), else one per source.
    """
    assert 1 <= len(sources) <= 3, f"gather_rows takes 1 to 3 sources, got {len(sources)}"
    first = sources[0]
    assert first.dim() == 4, f"sources must be [B, S, H, D], got shape {tuple(first.shape)}"
    for src in sources[1:]:
        assert src.shape == first.shape and src.dtype == first.dtype and src.device == first.device, (
            f"sources differ: {tuple(src.shape)} {src.dtype} {src.device} vs {tuple(first.shape)} {first.dtype} {first.device}"
        )
    assert indices.dim() == 1 and indices.dtype == torch.int32 and indices.is_contiguous(), (
        f"indices must be a contiguous 1-D int32 tensor, got {indices.dtype} shape {tuple(indices.shape)}"
    )
    assert indices.device == first.device, f"indices on {indices.device}, sources on {first.device}"
    _, seqlen, heads, head_dim = first.shape
    n_rows = indices.shape[0]
    out = torch.empty((len(sources), n_rows, heads, head_dim), dtype=first.dtype, device=first.device)
    if n_rows == 0:
        return out
    if all(src.stride() == first.stride() for src in sources):
        groups = [(list(sources), out)]
    else:
        groups = [([src], out[t : t + 1]) for t, src in enumerate(sources)]
    grid = (triton.cdiv(n_rows, block_rows) * heads,)
    for group, dst in groups:
        padded = group + [group[0]] * (3 - len(group))  # unused pointer slots; NUM_SRC keeps them unread
        _gather_rows_kernel[grid](
            *padded, dst, indices, n_rows, n_rows * heads * head_dim, seqlen, *group[0].stride(),
            NUM_SRC=len(group), HEADS=heads, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
            BLOCK_ROWS=block_rows, HEADS_INNER=heads_inner, num_warps=num_warps,
        )  # fmt: skip
    return out


def scatter_rows(
    packed: torch.Tensor,
    inverse: torch.Tensor,
    batch: int,
    seqlen: int,
    *,
    block_rows: int = BLOCK_ROWS,
    num_warps: int = NUM_WARPS,
    heads_inner: bool = HEADS_INNER,
) -> torch.Tensor:
    """Write packed rows ``[n, H, D]`` back to a new contiguous ``[batch, seqlen, H, D]``, zeros elsewhere.

    ``inverse`` ``[batch * seqlen]`` int32 holds each padded row's packed position, or -1 for a zero row.
    """
    assert packed.dim() == 3, f"packed must be [n, H, D], got shape {tuple(packed.shape)}"
    assert inverse.dtype == torch.int32 and inverse.is_contiguous() and inverse.shape == (batch * seqlen,), (
        f"inverse must be a contiguous int32 [{batch * seqlen}] tensor, got {inverse.dtype} shape {tuple(inverse.shape)}"
    )
    assert inverse.device == packed.device, f"inverse on {inverse.device}, packed on {packed.device}"
    _, heads, head_dim = packed.shape
    out = torch.empty((batch, seqlen, heads, head_dim), dtype=packed.dtype, device=packed.device)
    n_dst_rows = batch * seqlen
    if n_dst_rows == 0:
        return out
    grid = (triton.cdiv(n_dst_rows, block_rows) * heads,)
    _scatter_rows_kernel[grid](
        packed, out, inverse, n_dst_rows, *packed.stride(),
        HEADS=heads, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_ROWS=block_rows,
        HEADS_INNER=heads_inner, num_warps=num_warps,
    )  # fmt: skip
    return out
