"""Cross-attention (S_q != S_k) and GQA on the fast path, against SDPA, on CPU with the torch stand-in; and
the bound-call cache: it never serves another mask, shape, layout or scale."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from varlen_masks import key_masks, row, text_image_mask
from varlen_torch_provider import make_torch_provider, needs_interpreter

from attn_dispatch_varlen_diffusion.attention import build_ops
from attn_dispatch_varlen_diffusion.meta import Strategy

pytestmark = needs_interpreter

H, D = 4, 16
RTOL, ATOL = 1e-2, 5e-2

MASKS = {  # key masks [B, S_k]
    "prefix": torch.tensor([row("prefix", 9, 4), row("full", 9), row("none", 9)]),
    "window": torch.tensor([row("suffix", 9, 3), row("window", 9, 2, 7), row("prefix", 9, 1)]),
    "general": text_image_mask([2, 5, 0], text=5, image=4, text_first=True),
}


def sdpa(q, k, v, mask, scale=None) -> torch.Tensor:
    """The definition, in float32: every query row attends to its batch element's valid keys."""
    group = q.shape[2] // k.shape[2]
    k, v = (x.float().repeat_interleave(group, dim=2).transpose(1, 2) for x in (k, v))
    out = F.scaled_dot_product_attention(q.float().transpose(1, 2), k, v, attn_mask=mask[:, None, None, :], scale=scale)
    return out.transpose(1, 2)


def tensors(batch, seqlen_q, seqlen_k, kv_heads, *, fused_kv=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seqlen_q, H, D, generator=gen).bfloat16()
    if fused_kv:  # slices of one K/V projection: strided rows
        k, v = torch.randn(batch, seqlen_k, 2, kv_heads, D, generator=gen).bfloat16().unbind(2)
    else:
        k, v = (torch.randn(batch, seqlen_k, kv_heads, D, generator=gen).bfloat16() for _ in range(2))
    return q, k, v


def ops_for(general="kv_pack", **kwargs):
    return build_ops(make_torch_provider(), general_strategy=general, device_type="cpu", **kwargs)


def check(out, q, k, v, mask, scale=None):
    """All query rows valid (cross-attention); a batch element with no valid key: zeros."""
    assert out.shape == (*q.shape[:3], v.shape[-1]) and out.dtype == q.dtype and out.is_contiguous()
    ref = sdpa(q, k, v, mask, scale)
    for b in range(mask.shape[0]):
        if mask[b].any():
            torch.testing.assert_close(out[b].float(), ref[b], rtol=RTOL, atol=ATOL)
        else:
            assert not out[b].any()


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("seqlen_q", [3, 13])
@pytest.mark.parametrize(("general", "zero_copy", "pack_queries"), [
    ("kv_pack", True, None), ("kv_pack", False, None), ("qkv_pack", True, True), ("qkv_pack", False, True),
    ("qkv_pack", False, False),
])  # fmt: skip
@pytest.mark.parametrize("name", list(MASKS))
def test_cross_attention_matches_sdpa_on_flash_attention(name, general, zero_copy, pack_queries, seqlen_q, kv_heads):
    mask = MASKS[name]
    q, k, v = tensors(mask.shape[0], seqlen_q, mask.shape[1], kv_heads, fused_kv=name == "window")
    ops = ops_for(general, zero_copy=zero_copy, pack_queries=pack_queries)
    meta = ops.build_mask_meta(mask)
    check(ops.masked_attention(q, k, v, meta), q, k, v, mask)
    calls = ops.provider.fwd.calls
    assert len(calls) == 1 and not calls[0]["seqused_q"]  # FlashAttention ran, on every (padded) query row
    assert calls[0]["seqused_k"] is (meta.strategy is Strategy.ZERO_COPY)


@pytest.mark.parametrize("general", ["kv_pack", "qkv_pack"])
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_gqa_self_attention_follows_the_row_contract(general, kv_heads):
    mask = text_image_mask([2, 4], text=5, image=3, text_first=True)
    q, k, v = tensors(*mask.shape, mask.shape[1], kv_heads)
    for pack_queries in (True, False):
        ops = ops_for(general, pack_queries=pack_queries)
        out = ops.masked_attention(q, k, v, ops.build_mask_meta(mask))
        ref = sdpa(q, k, v, mask)
        torch.testing.assert_close(out[mask].float(), ref[mask], rtol=RTOL, atol=ATOL)
        if general == "qkv_pack":
            assert not out[~mask].any()
        else:
            torch.testing.assert_close(out[~mask].float(), ref[~mask], rtol=RTOL, atol=ATOL)


@settings(max_examples=25, deadline=None)
@given(mask=key_masks(), seqlen_q=st.integers(1, 10), kv_heads=st.sampled_from([1, 2, 4]), general=st.sampled_from(["kv_pack", "qkv_pack"]))
def test_random_key_masks_cross_attention(mask, seqlen_q, kv_heads, general):
    q, k, v = tensors(mask.shape[0], seqlen_q, mask.shape[1], kv_heads)
    ops = ops_for(general)
    out = ops.masked_attention(q, k, v, ops.build_mask_meta(mask))
    if seqlen_q != mask.shape[1]:
        check(out, q, k, v, mask)


def test_softmax_scale_in_cross_attention():
    mask = MASKS["general"]
    q, k, v = tensors(3, 6, 9, 2)
    ops = ops_for()
    check(ops.masked_attention(q, k, v, ops.build_mask_meta(mask), softmax_scale=0.3), q, k, v, mask, scale=0.3)


def test_key_mask_must_match_the_keys():
    ops = ops_for()
    q, k, v = tensors(2, 6, 5, 2)
    with pytest.raises(ValueError, match="^mask_meta: key_mask shape"):
        ops.masked_attention(q, k, v, ops.build_mask_meta(torch.ones(2, 6, dtype=torch.bool)))  # S_q, not S_k


# The bound-call cache.
def test_bound_calls_are_per_metadata_and_call_shape():
    ops = ops_for()
    mask = MASKS["general"]
    meta = ops.build_mask_meta(mask)
    shapes = [(3, 9, 4), (5, 9, 4), (5, 9, 1), (9, 9, 2)]  # (S_q, S_k, H_kv): cross, another S_q, GQA, self
    for seqlen_q, seqlen_k, kv_heads in shapes:
        q, k, v = tensors(3, seqlen_q, seqlen_k, kv_heads, seed=seqlen_q)
        first = ops.masked_attention(q, k, v, meta)
        check(first, q, k, v, mask) if seqlen_q != seqlen_k else None
        assert torch.equal(ops.masked_attention(q, k, v, meta), first)  # served from the cache: same answer
    assert len(meta.calls) == len(shapes)
    other = ops.build_mask_meta(MASKS["window"])  # same sizes, other contents: its own calls
    assert other.calls == {}
    q, k, v = tensors(3, 5, 9, 4)
    check(ops.masked_attention(q, k, v, other), q, k, v, MASKS["window"])
    check(ops.masked_attention(q, k, v, meta), q, k, v, mask)


def test_bound_calls_distinguish_layout_scale_and_ops_object():
    mask = MASKS["prefix"]
    ops, second = ops_for(), ops_for()
    meta = ops.build_mask_meta(mask)
    q, k, v = tensors(3, 5, 9, 2)
    fused_k, fused_v = tensors(3, 5, 9, 2, fused_kv=True)[1:]
    check(ops.masked_attention(q, k, v, meta), q, k, v, mask)
    check(ops.masked_attention(q, fused_k, fused_v, meta), q, fused_k, fused_v, mask)  # other strides
    check(ops.masked_attention(q, k, v, meta, softmax_scale=0.2), q, k, v, mask, scale=0.2)
    assert len(meta.calls) == 3
    second.masked_attention(q, k, v, meta)  # a meta reused by another ops object runs that object's provider
    assert len(second.provider.fwd.calls) == 1 and len(meta.calls) == 4


def test_bound_call_runs_new_inputs_of_the_same_layout():
    """The closure takes q/k/v per call: fresh tensors with the same shapes give their own answer."""
    mask = MASKS["general"]
    ops = ops_for()
    meta = ops.build_mask_meta(mask)
    for seed in range(3):
        q, k, v = tensors(3, 4, 9, 2, seed=seed)
        check(ops.masked_attention(q, k, v, meta), q, k, v, mask)
    assert len(meta.calls) == 1


def test_a_call_bound_during_graph_capture_is_not_cached(monkeypatch):
    """Tensors made while capturing (b * S_q) hold values only after a replay: such a binding serves the
    captured call alone, never a later eager call."""
    from attn_dispatch_varlen_diffusion import attention

    mask = MASKS["general"]
    ops = ops_for()
    meta = ops.build_mask_meta(mask)
    q, k, v = tensors(mask.shape[0], 5, mask.shape[1], 2)
    monkeypatch.setattr(attention, "_capturing", lambda q: True)
    check(ops.masked_attention(q, k, v, meta), q, k, v, mask)
    assert meta.calls == {}
    monkeypatch.setattr(attention, "_capturing", lambda q: False)
    check(ops.masked_attention(q, k, v, meta), q, k, v, mask)
    assert len(meta.calls) == 1
