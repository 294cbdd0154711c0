"""build_mask_meta: the layout classification, the varlen tensors, and the strategy each mask picks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from varlen_masks import key_masks, row, text_image_mask
from varlen_torch_provider import make_torch_provider

from attn_dispatch import MaskMeta
from attn_dispatch_varlen_diffusion.attention import build_ops
from attn_dispatch_varlen_diffusion.meta import (
    Layout,
    Strategy,
    VarlenMaskMeta,
    classify,
    make_mask_meta,
    packing_queries_pays,
)

S = 8


def mask_of(*rows: list[bool]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


@pytest.mark.parametrize(
    ("rows", "layout"),
    [
        ([row("full", S)], Layout.PREFIX),
        ([row("prefix", S, 5), row("full", S)], Layout.PREFIX),  # right padding
        ([row("none", S), row("prefix", S, 3)], Layout.PREFIX),  # a row with no valid key
        ([row("suffix", S, 3)], Layout.WINDOW),  # left padding
        ([row("window", S, 2, 6), row("prefix", S, 4)], Layout.WINDOW),
        ([row("gaps", S, bits=0b11100111)], Layout.GENERAL),
        (text_image_mask([3, 1], text=4, image=4, text_first=True).tolist(), Layout.GENERAL),
        (text_image_mask([3, 1], text=4, image=4, text_first=False).tolist(), Layout.PREFIX),
    ],
)
def test_layout_classification(rows, layout):
    assert classify(mask_of(*rows))[0] is layout


def python_layout(mask: torch.Tensor) -> Layout:
    """The definition, written plainly: count runs and starts per row."""
    runs, starts = [], []
    for bits in mask.tolist():
        row_runs = [s for s in range(len(bits)) if bits[s] and (s == 0 or not bits[s - 1])]
        runs.append(len(row_runs))
        starts.append(row_runs[0] if row_runs else 0)
    if max(runs) > 1:
        return Layout.GENERAL
    return Layout.WINDOW if max(starts) > 0 else Layout.PREFIX


@settings(max_examples=60, deadline=None)
@given(key_masks(max_batch=4, max_seqlen=10))
def test_metadata_tensors_match_their_definitions(mask):
    batch, seqlen = mask.shape
    lengths = mask.sum(1).to(torch.int32)
    flat = mask.reshape(-1).nonzero().squeeze(1).to(torch.int32)
    for strategy, pack_queries in ((Strategy.KV_PACK, None), (Strategy.QKV_PACK, True), (Strategy.QKV_PACK, False)):
        meta = make_mask_meta(mask, general_strategy=strategy, pack_queries=pack_queries)
        assert meta.layout is python_layout(mask)
        assert (meta.batch, meta.seqlen, meta.total) == (batch, seqlen, int(mask.sum()))
        assert torch.equal(meta.seqlens, lengths)
        assert torch.equal(meta.cu_seqlens_padded, torch.arange(batch + 1, dtype=torch.int32) * seqlen)
        if meta.strategy is Strategy.ZERO_COPY:
            for b in range(batch):  # the row's keys are the rows cu_seqlens_k[b] : + seqlens[b] of k
                start = int(meta.cu_seqlens_k[b])
                assert mask.reshape(-1)[start : start + int(lengths[b])].all()
            assert int(meta.cu_seqlens_k[-1]) == batch * seqlen
            assert meta.indices is None and meta.inverse is None
        else:
            assert torch.equal(meta.cu_seqlens_k, torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).int()]))
            if meta.strategy is Strategy.KV_PACK:  # every token, valid ones first: a length fixed by the shape
                masked_flat = (~mask).reshape(-1).nonzero().squeeze(1).to(torch.int32)
                assert torch.equal(meta.indices, torch.cat([flat, masked_flat]))
            else:
                assert torch.equal(meta.indices, flat)
            assert meta.pack_queries is (meta.strategy is Strategy.QKV_PACK and pack_queries)
            if meta.pack_queries:
                expected = torch.full((batch * seqlen,), -1, dtype=torch.int32)
                expected[flat.long()] = torch.arange(flat.numel(), dtype=torch.int32)
                assert torch.equal(meta.inverse, expected) and meta.masked is None
            elif meta.strategy is Strategy.QKV_PACK:
                assert meta.inverse is None
                assert torch.equal(meta.masked, (~mask).reshape(-1).nonzero().squeeze(1))
            else:
                assert meta.inverse is None and meta.masked is None


PREFIX = mask_of(row("prefix", S, 5), row("full", S))
WINDOW = mask_of(row("suffix", S, 3), row("full", S))
GENERAL = mask_of(row("gaps", S, bits=0b10110011), row("full", S))
FULL_CAPS = make_torch_provider()
NO_SEQUSED_Q = make_torch_provider(has_seqused_q=False)
NO_OUT = make_torch_provider(writes_out=False)


@pytest.mark.parametrize(
    ("mask", "general", "provider", "zero_copy", "strategy"),
    [
        (PREFIX, "kv_pack", FULL_CAPS, True, Strategy.ZERO_COPY),
        (WINDOW, "kv_pack", FULL_CAPS, True, Strategy.ZERO_COPY),
        (GENERAL, "kv_pack", FULL_CAPS, True, Strategy.KV_PACK),
        (PREFIX, "kv_pack", FULL_CAPS, False, Strategy.KV_PACK),  # forced packing (benchmarks)
        (PREFIX, "qkv_pack", FULL_CAPS, True, Strategy.ZERO_COPY),  # zeroing contract via seqused_q
        (GENERAL, "qkv_pack", FULL_CAPS, True, Strategy.QKV_PACK),
        (PREFIX, "qkv_pack", FULL_CAPS, False, Strategy.QKV_PACK),
        (PREFIX, "qkv_pack", NO_SEQUSED_Q, True, Strategy.QKV_PACK),  # cannot skip masked query rows
        (WINDOW, "qkv_pack", NO_OUT, True, Strategy.QKV_PACK),  # skipped rows would be uninitialised
        (WINDOW, "kv_pack", NO_SEQUSED_Q, True, Strategy.ZERO_COPY),  # the SDPA contract needs neither
    ],
)
def test_strategy_choice(mask, general, provider, zero_copy, strategy):
    meta = build_ops(provider, general_strategy=general, zero_copy=zero_copy, device_type="cpu").build_mask_meta(mask)
    assert isinstance(meta, VarlenMaskMeta) and meta.strategy is strategy
    assert meta.zero_masked_queries is (general == "qkv_pack")


def test_int_mask_is_read_as_nonzero_attends():
    ops = build_ops(FULL_CAPS, general_strategy="kv_pack", device_type="cpu")
    meta = ops.build_mask_meta(torch.tensor([[2, 1, 0, 0], [1, 0, 7, 1]], dtype=torch.int32))
    assert meta.key_mask.dtype == torch.bool and meta.layout is Layout.GENERAL and meta.total == 5


def test_float_mask_gets_the_original_metadata():
    bias = torch.zeros(2, S)
    meta = build_ops(FULL_CAPS, general_strategy="kv_pack", device_type="cpu").build_mask_meta(bias)
    assert type(meta) is MaskMeta and meta.key_mask is bias


def test_mask_must_be_two_dimensional():
    with pytest.raises(ValueError, match="^key_mask:"):
        build_ops(FULL_CAPS, general_strategy="kv_pack", device_type="cpu").build_mask_meta(torch.ones(2, 3, 4, dtype=torch.bool))


def test_env_picks_the_general_strategy(monkeypatch, caplog):
    env = "ATTN_DISPATCH_VARLEN_DIFFUSION_STRATEGY"
    assert build_ops(FULL_CAPS).general_strategy is Strategy.KV_PACK
    monkeypatch.setenv(env, "QKV_PACK")
    assert build_ops(FULL_CAPS).general_strategy is Strategy.QKV_PACK
    monkeypatch.setenv(env, "zero_copy")  # not a general-mask strategy: warned, default kept
    assert build_ops(FULL_CAPS).general_strategy is Strategy.KV_PACK
    assert env in caplog.text


def test_qkv_pack_packs_queries_only_when_dropping_them_pays():
    """Packing Q and scattering back moves 8 * H * D bytes per row; dropping a masked query row saves its
    attention over the valid keys. Qwen-Image text padding (64 of 4352 rows masked) keeps Q in place."""
    assert not packing_queries_pays(1, 4352, 4288)  # 64 masked rows x 4288 keys: 63 < 280
    assert not packing_queries_pays(2, 1024, 1024)  # half masked, 512 keys per row: 256 < 280
    assert packing_queries_pays(2, 2048, 2048)  # half masked, 1024 keys per row: 512 > 280
    assert not packing_queries_pays(1, 8, 8)  # nothing masked
    heavy = torch.zeros(2, 2048, dtype=torch.bool)
    heavy[:, :1024] = True
    heavy[:, 1500] = True  # a gap: general layout
    meta = make_mask_meta(heavy, general_strategy=Strategy.QKV_PACK)
    assert meta.strategy is Strategy.QKV_PACK and meta.pack_queries and meta.inverse is not None
    light = torch.ones(2, 64, dtype=torch.bool)
    light[:, 10:14] = False
    meta = make_mask_meta(light, general_strategy=Strategy.QKV_PACK)
    assert meta.strategy is Strategy.QKV_PACK and not meta.pack_queries and meta.masked.numel() == 8
