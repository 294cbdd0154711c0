"""masked_attention against the original path (SDPA + boolean key mask), on CPU with the torch stand-in.

The row contract under test (module docstring of ``attention``): valid query rows are SDPA's; masked
query rows are SDPA's by default and zeros under qkv_pack; batch elements with no valid key are zeros.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from varlen_masks import key_masks, row, text_image_mask
from varlen_torch_provider import make_torch_provider, needs_interpreter

from attn_dispatch.reference import masked as original
from attn_dispatch_varlen_diffusion.attention import build_ops
from attn_dispatch_varlen_diffusion.meta import Strategy

pytestmark = needs_interpreter

H, D = 2, 16
RTOL, ATOL = 1e-2, 5e-2  # bf16 FlashAttention tolerance, as the seed PR used


def qkv(batch: int, seqlen: int, *, dtype=torch.bfloat16, fused: bool = False, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    if fused:  # slices of one projection output, as diffusion models split it
        return torch.randn(batch, seqlen, 3, H, D, generator=gen).to(dtype).unbind(2)
    return tuple(torch.randn(batch, seqlen, H, D, generator=gen).to(dtype) for _ in range(3))


def sdpa(q, k, v, mask):
    return original.masked_attention(q, k, v, original.build_mask_meta(mask)).float()


def ops_for(general: str, *, zero_copy: bool = True, pack_queries: bool | None = None, key_pages: bool = False, **caps):
    return build_ops(
        make_torch_provider(**caps), general_strategy=general, zero_copy=zero_copy, device_type="cpu",
        pack_queries=pack_queries, key_pages=key_pages,
    )  # fmt: skip


def check_contract(out, q, k, v, mask, *, zero_masked_queries: bool):
    """Every row against what the contract says it must be."""
    ref = sdpa(q, k, v, mask)
    out = out.float()
    has_keys = mask.any(dim=1)
    for b in range(mask.shape[0]):
        if not has_keys[b]:
            # Ours: zeros. SDPA's depends on backend and version (NaN, or zeros as torch 2.13's CPU kernels give).
            assert torch.equal(out[b], torch.zeros_like(out[b]))
            continue
        valid = mask[b]
        torch.testing.assert_close(out[b, valid], ref[b, valid], rtol=RTOL, atol=ATOL)
        if zero_masked_queries:
            assert torch.equal(out[b, ~valid], torch.zeros_like(out[b, ~valid]))
        else:
            torch.testing.assert_close(out[b, ~valid], ref[b, ~valid], rtol=RTOL, atol=ATOL)


@settings(max_examples=60, deadline=None)
@given(
    mask=key_masks(), general=st.sampled_from(["kv_pack", "qkv_pack"]), fused=st.booleans(),
    pack_queries=st.sampled_from([None, True, False]),
)  # fmt: skip
def test_random_masks_follow_the_row_contract(mask, general, fused, pack_queries):
    q, k, v = qkv(*mask.shape, fused=fused)
    ops = ops_for(general, pack_queries=pack_queries)
    meta = ops.build_mask_meta(mask)
    out = ops.masked_attention(q, k, v, meta)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    check_contract(out, q, k, v, mask, zero_masked_queries=general == "qkv_pack")


@settings(max_examples=15, deadline=None)
@given(mask=key_masks())
def test_zero_copy_and_packed_strategies_agree_exactly(mask):
    """Same kernel, same keys: zero-copy equals kv_pack (all rows), its zeroing form equals qkv_pack, and
    qkv_pack with Q in place is kv_pack with the masked rows zeroed."""
    q, k, v = qkv(*mask.shape, fused=True)
    results = {}
    for general, pack_queries in (("kv_pack", None), ("qkv_pack", True), ("qkv_pack", False)):
        for zero_copy in (True, False):
            ops = ops_for(general, zero_copy=zero_copy, pack_queries=pack_queries)
            meta = ops.build_mask_meta(mask)
            results[meta.strategy, general, pack_queries] = ops.masked_attention(q, k, v, meta)
    in_place, kv_pack = results[Strategy.QKV_PACK, "qkv_pack", False], results[Strategy.KV_PACK, "kv_pack", None]
    assert torch.equal(in_place[mask], kv_pack[mask]) and not in_place[~mask].any()
    if (Strategy.ZERO_COPY, "kv_pack", None) in results:  # prefix / window layouts
        assert torch.equal(results[Strategy.ZERO_COPY, "kv_pack", None], kv_pack)
        for pack_queries in (True, False):
            assert torch.equal(results[Strategy.ZERO_COPY, "qkv_pack", pack_queries], results[Strategy.QKV_PACK, "qkv_pack", pack_queries])


@settings(max_examples=15, deadline=None)
@given(mask=key_masks(), general=st.sampled_from(["kv_pack", "qkv_pack"]), cross=st.booleans())
def test_key_pages_read_the_same_keys_as_the_gather(mask, general, cross):
    """K/V read in place as one-row pages (no gather) give the gather's bytes: same keys, same order."""
    q, k, v = qkv(*mask.shape, fused=True)
    if cross:
        q = qkv(mask.shape[0], mask.shape[1] + 3, seed=1)[0]
    outs = []
    for key_pages in (False, True):
        ops = ops_for(general, zero_copy=False, pack_queries=False, key_pages=key_pages)
        outs.append(ops.masked_attention(q, k, v, ops.build_mask_meta(mask)))
        if mask.any():
            assert ops.provider.fwd.paged_calls == [key_pages]
    assert torch.equal(*outs)


@pytest.mark.parametrize(("general", "zero_copy"), [("kv_pack", True), ("kv_pack", False), ("qkv_pack", False)])
def test_scheduling_is_left_to_the_kernel(general, zero_copy):
    """A provider that takes FA3's scheduler metadata is handed none: for these non-paged calls it cost
    host time and saved no GPU time on the H200 (benchmarks/diag_fa3_metadata.py)."""
    mask = text_image_mask([3, 5], text=6, image=7, text_first=not zero_copy)
    q, k, v = qkv(*mask.shape)
    ops = ops_for(general, zero_copy=zero_copy, pack_queries=True, metadata=True)
    meta = ops.build_mask_meta(mask)
    for _ in range(2):
        check_contract(ops.masked_attention(q, k, v, meta), q, k, v, mask, zero_masked_queries=general == "qkv_pack")
    assert ops.provider.fwd.metadata_counts == {"builds": 0, "calls": 0}


@pytest.mark.parametrize("general", ["kv_pack", "qkv_pack"])
@pytest.mark.parametrize("layout", ["prefix", "general"])
def test_one_row_heads_first_layout_is_passed_as_a_view(layout, general):
    """B=1 q/k/v as [B, S, H, D] transposes of [B, H, S, D] tensors: the provider gets q's rows as a view
    of q (no copy), and the output equals that of contiguous copies."""
    mask = text_image_mask([5], text=8, image=24, text_first=layout == "general")
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, H, mask.shape[1], D, generator=gen).bfloat16().transpose(1, 2) for _ in range(3))
    provider = make_torch_provider()
    seen = []
    fwd = provider.fwd

    def spy(q_rows, *args, **kwargs):
        seen.append(q_rows)
        return fwd(q_rows, *args, **kwargs)

    ops = build_ops(dataclasses.replace(provider, fwd=spy), general_strategy=general, device_type="cpu", pack_queries=False)
    meta = ops.build_mask_meta(mask)
    out = ops.masked_attention(q, k, v, meta)
    assert len(seen) == 1 and seen[0].data_ptr() == q.data_ptr() and seen[0].stride() == q[0].stride()
    assert torch.equal(out, ops.masked_attention(*(x.contiguous() for x in (q, k, v)), meta))


def test_all_masked_row_is_zeros():
    mask = torch.tensor([row("none", 6), row("prefix", 6, 4)])
    q, k, v = qkv(2, 6)
    for general in ("kv_pack", "qkv_pack"):
        for zero_copy in (True, False):
            ops = ops_for(general, zero_copy=zero_copy)
            out = ops.masked_attention(q, k, v, ops.build_mask_meta(mask))
            check_contract(out, q, k, v, mask, zero_masked_queries=general == "qkv_pack")


def test_whole_batch_masked_returns_zeros_without_calling_the_provider():
    ops = ops_for("kv_pack")
    q, k, v = qkv(2, 5)
    out = ops.masked_attention(q, k, v, ops.build_mask_meta(torch.zeros(2, 5, dtype=torch.bool)))
    assert torch.equal(out, torch.zeros_like(q)) and ops.provider.fwd.calls == []


@pytest.mark.parametrize("general", ["kv_pack", "qkv_pack"])
def test_left_padding_runs_zero_copy(general):
    mask = torch.tensor([row("suffix", 9, 3), row("suffix", 9, 7)])
    q, k, v = qkv(2, 9)
    ops = ops_for(general)
    meta = ops.build_mask_meta(mask)
    assert meta.strategy is Strategy.ZERO_COPY
    check_contract(ops.masked_attention(q, k, v, meta), q, k, v, mask, zero_masked_queries=general == "qkv_pack")
    # out= only where rows are skipped (zeroing contract); otherwise every row is written and FA allocates
    assert ops.provider.fwd.calls == [{"seqused_q": general == "qkv_pack", "seqused_k": True, "out": general == "qkv_pack"}]


@pytest.mark.parametrize(("general", "pack_queries"), [("kv_pack", None), ("qkv_pack", True), ("qkv_pack", False)])
def test_text_padding_gap_before_image_tokens_packs(general, pack_queries):
    mask = text_image_mask([3, 5], text=6, image=7, text_first=True)
    q, k, v = qkv(*mask.shape, fused=True)
    ops = ops_for(general, pack_queries=pack_queries)
    meta = ops.build_mask_meta(mask)
    assert meta.strategy is Strategy(general) and meta.pack_queries is bool(pack_queries)
    check_contract(ops.masked_attention(q, k, v, meta), q, k, v, mask, zero_masked_queries=general == "qkv_pack")


@pytest.mark.parametrize(("caps", "general"), [({"has_seqused_q": False}, "qkv_pack"), ({"writes_out": False}, "kv_pack")])
def test_providers_with_fewer_capabilities(caps, general):
    mask = text_image_mask([2, 4], text=5, image=6, text_first=False)
    q, k, v = qkv(*mask.shape)
    ops = ops_for(general, **caps)
    out = ops.masked_attention(q, k, v, ops.build_mask_meta(mask))
    check_contract(out, q, k, v, mask, zero_masked_queries=general == "qkv_pack")


def test_softmax_scale_is_passed_through():
    mask = text_image_mask([3], text=4, image=4, text_first=True)
    q, k, v = qkv(*mask.shape)
    ops = ops_for("kv_pack")
    got = ops.masked_attention(q, k, v, ops.build_mask_meta(mask), softmax_scale=0.5)
    ref = original.masked_attention(q, k, v, original.build_mask_meta(mask), softmax_scale=0.5)
    torch.testing.assert_close(got.float(), ref.float(), rtol=RTOL, atol=ATOL)


# Fallbacks: the original function itself runs, so results are byte-identical to it.
def assert_original_path(ops, q, k, v, mask):
    got = ops.masked_attention(q, k, v, ops.build_mask_meta(mask))
    want = original.masked_attention(q, k, v, original.build_mask_meta(mask))
    assert torch.equal(got.nan_to_num(), want.nan_to_num()) and got.isnan().equal(want.isnan())
    assert ops.provider.fwd.calls == []


def test_float_mask_falls_back():
    mask = torch.zeros(2, 6)
    mask[0, 4:] = float("-inf")
    assert_original_path(ops_for("kv_pack"), *qkv(2, 6), mask)


def test_head_dim_flash_attention_does_not_take_falls_back():
    mask = torch.tensor([row("prefix", 7, 5), row("full", 7)])
    q, k, v = (torch.randn(2, 7, H, 12).bfloat16() for _ in range(3))  # not a multiple of 8
    assert_original_path(ops_for("kv_pack"), q, k, v, mask)


def test_shapes_the_original_refuses_get_its_error():
    q, k, _ = qkv(2, 7)
    v = torch.randn(2, 7, H, D // 2).bfloat16()  # value head dim other than the key's: not the fast path
    ops = ops_for("kv_pack")
    with pytest.raises(ValueError, match="^v:"):
        ops.masked_attention(q, k, v, ops.build_mask_meta(torch.ones(2, 7, dtype=torch.bool)))


@pytest.mark.parametrize("dtype", [torch.float32])  # (the original refuses float64 itself)
def test_unsupported_dtype_falls_back(dtype):
    mask = text_image_mask([1, 3], text=4, image=3, text_first=True)
    assert_original_path(ops_for("kv_pack"), *qkv(*mask.shape, dtype=dtype), mask)


def test_tensors_on_another_device_type_fall_back():
    ops = build_ops(make_torch_provider(), general_strategy="kv_pack")  # expects cuda tensors
    mask = text_image_mask([1, 3], text=4, image=3, text_first=True)
    assert_original_path(ops, *qkv(*mask.shape), mask)


def test_mask_on_another_device_is_an_error():
    ops = ops_for("kv_pack")
    q, k, v = qkv(2, 5)
    meta = ops.build_mask_meta(torch.ones(2, 5, dtype=torch.bool))
    elsewhere = dataclasses.replace(meta, key_mask=meta.key_mask.to("meta"))
    with pytest.raises(ValueError, match="^mask_meta: key_mask is on meta"):
        ops.masked_attention(q, k, v, elsewhere)


def test_mask_of_another_shape_is_an_error():
    ops = ops_for("kv_pack")
    with pytest.raises(ValueError, match="^mask_meta: key_mask shape"):
        ops.masked_attention(*qkv(2, 5), ops.build_mask_meta(torch.ones(2, 6, dtype=torch.bool)))
