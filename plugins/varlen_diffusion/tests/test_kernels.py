"""The fused pack (gather) and scatter kernels are bit-exact copies: compared with torch's index ops."""

from __future__ import annotations

import pytest
import torch
from attn_dispatch_flash.rows import gather_rows, scatter_rows
from varlen_torch_provider import needs_interpreter

pytestmark = needs_interpreter

B, S, H = 2, 11, 3


def bits(x: torch.Tensor) -> torch.Tensor:
    """Compare bit patterns, so -0.0 vs 0.0 or a changed NaN payload would show."""
    return x.view({2: torch.int16, 4: torch.int32}[x.element_size()])


def reference_gather(sources, indices):
    return torch.stack([x.reshape(-1, *x.shape[2:]).index_select(0, indices.long()) for x in sources])


def reference_scatter(packed, indices, batch, seqlen):
    out = torch.zeros(batch * seqlen, *packed.shape[1:], dtype=packed.dtype)
    return out.index_copy_(0, indices.long(), packed).view(batch, seqlen, *packed.shape[1:])


def valid_indices(mask: torch.Tensor) -> torch.Tensor:
    return mask.reshape(-1).nonzero().squeeze(1).to(torch.int32)


def inverse_of(indices: torch.Tensor, rows: int) -> torch.Tensor:
    inverse = torch.full((rows,), -1, dtype=torch.int32)
    inverse[indices.long()] = torch.arange(indices.numel(), dtype=torch.int32)
    return inverse


def layouts(dtype: torch.dtype, head_dim: int) -> dict[str, list[torch.Tensor]]:
    fused = torch.randn(B, S, 3, H, head_dim).to(dtype)  # slices of one QKV projection: strided rows
    heads_first = torch.randn(3, B, H, S, head_dim).to(dtype).transpose(2, 3)  # [B, S, H, D] views of [B, H, S, D]
    contiguous = torch.randn(3, B, S, H, head_dim).to(dtype)
    return {
        "contiguous": list(contiguous.unbind(0)),
        "qkv_slices": list(fused.unbind(2)),
        "heads_first": list(heads_first.unbind(0)),
        "mixed_strides": [fused[:, :, 0], contiguous[1], heads_first[2]],
    }


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "qkv_slices", "heads_first", "mixed_strides"])
@pytest.mark.parametrize("num_sources", [1, 2, 3])
def test_gather_matches_index_select(dtype, layout, num_sources):
    torch.manual_seed(0)
    sources = layouts(dtype, 16)[layout][:num_sources]
    indices = valid_indices(torch.rand(B, S) > 0.4)
    got = gather_rows(sources, indices)
    assert got.is_contiguous() and got.shape == (num_sources, indices.numel(), H, 16)
    assert torch.equal(bits(got), bits(reference_gather(sources, indices)))


@pytest.mark.parametrize("head_dim", [24, 8])  # not a power of two (masked lanes); one 16-byte vector
def test_gather_odd_head_dims(head_dim):
    sources = layouts(torch.bfloat16, head_dim)["qkv_slices"]
    indices = valid_indices(torch.rand(B, S) > 0.5)
    assert torch.equal(bits(gather_rows(sources, indices)), bits(reference_gather(sources, indices)))


@pytest.mark.parametrize("count", [0, 1, B * S])
def test_gather_no_one_and_every_row(count):
    sources = layouts(torch.bfloat16, 16)["contiguous"]
    indices = torch.arange(B * S, dtype=torch.int32)[:count]
    got = gather_rows(sources, indices)
    assert got.shape == (3, count, H, 16)
    assert torch.equal(bits(got), bits(reference_gather(sources, indices)))


def test_gather_rejects_bad_arguments():
    x = torch.randn(B, S, H, 16)
    with pytest.raises(AssertionError, match="int32"):
        gather_rows([x], torch.arange(3))
    with pytest.raises(AssertionError, match="sources differ"):
        gather_rows([x, x.half()], torch.arange(3, dtype=torch.int32))
    with pytest.raises(AssertionError, match=r"\[B, S, H, D\]"):
        gather_rows([x[0]], torch.arange(3, dtype=torch.int32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("strided", [False, True])
def test_scatter_matches_index_copy_into_zeros(dtype, strided):
    torch.manual_seed(1)
    indices = valid_indices(torch.rand(B, S) > 0.4)
    wide = torch.randn(indices.numel(), H, 32).to(dtype)
    packed = wide[:, :, 8:24] if strided else wide[:, :, :16].contiguous()
    got = scatter_rows(packed, inverse_of(indices, B * S), B, S)
    assert got.is_contiguous() and got.shape == (B, S, H, 16)
    # scatter_rows allocates with torch.empty: equality also shows every element, zeros included, was written
    assert torch.equal(bits(got), bits(reference_scatter(packed, indices, B, S)))


def test_scatter_zero_valid_rows_writes_zeros():
    packed = torch.empty(0, H, 16, dtype=torch.bfloat16)
    got = scatter_rows(packed, torch.full((B * S,), -1, dtype=torch.int32), B, S)
    assert torch.equal(bits(got), bits(torch.zeros(B, S, H, 16, dtype=torch.bfloat16)))


def test_scatter_rejects_bad_inverse():
    with pytest.raises(AssertionError, match="inverse"):
        scatter_rows(torch.randn(2, H, 16), torch.zeros(B * S, dtype=torch.int64), B, S)


@pytest.mark.parametrize("heads_inner", [True, False])
@pytest.mark.parametrize("block_rows", [4, 32])  # one block and many; partial last blocks either way
def test_grid_orders_and_block_sizes_move_the_same_bytes(heads_inner, block_rows):
    torch.manual_seed(2)
    sources = layouts(torch.bfloat16, 16)["mixed_strides"]
    indices = valid_indices(torch.rand(B, S) > 0.3)
    tuning = {"heads_inner": heads_inner, "block_rows": block_rows}
    packed = gather_rows(sources, indices, **tuning)
    assert torch.equal(bits(packed), bits(reference_gather(sources, indices)))
    got = scatter_rows(packed[0], inverse_of(indices, B * S), B, S, **tuning)
    assert torch.equal(bits(got), bits(reference_scatter(packed[0], indices, B, S)))


def test_bound_launchers_off_the_gpu_equal_the_plain_launches():
    """Off CUDA the bound launchers call the plain functions; index_select_gather is the torch comparison."""
    from attn_dispatch_flash.rows_launch import bind_gather, bind_scatter, index_select_gather

    torch.manual_seed(3)
    indices = valid_indices(torch.rand(B, S) > 0.4)
    for layout in ("contiguous", "qkv_slices"):
        sources = layouts(torch.bfloat16, 16)[layout]
        want = reference_gather(sources, indices)
        assert torch.equal(bits(bind_gather(sources, indices)(*sources)), bits(want))
        assert torch.equal(bits(index_select_gather(sources, indices)(*sources)), bits(want))
    assert index_select_gather(layouts(torch.bfloat16, 16)["heads_first"], indices) is None  # rows not viewable
    packed = want[0]
    got = bind_scatter(packed, inverse_of(indices, B * S), B, S)(packed)
    assert torch.equal(bits(got), bits(reference_scatter(packed, indices, B, S)))
