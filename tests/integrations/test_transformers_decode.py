"""Decode steps on the device (``transformers_decode``): each row's visible keys as one-row pages, no
host sync, exact for any mask a one-query step can have; on CPU through the stand-in provider."""

from __future__ import annotations

import logging
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

import attn_dispatch_cuda_fa3  # noqa: E402
from fa3_torch_provider import make_torch_provider  # noqa: E402
from transformers import AutoModelForCausalLM, DynamicCache, Gemma2Config, LlamaConfig  # noqa: E402

from attn_dispatch.integrations import transformers as integration  # noqa: E402
from attn_dispatch.integrations import transformers_decode as decode  # noqa: E402
from attn_dispatch.integrations import transformers_meta  # noqa: E402

SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=128)


@pytest.fixture
def calls():
    provider, counters = make_torch_provider()
    integration.use_ops(attn_dispatch_cuda_fa3.build_ops(provider))
    integration.stats.__init__()
    yield counters
    integration.use_ops(None)


def model_of(config_class=LlamaConfig, **extra):
    torch.manual_seed(0)
    cfg = config_class(num_hidden_layers=2, **SMALL, **extra)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="attn_dispatch", dtype=torch.bfloat16).eval()


def batch(holes: bool = False):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (3, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :1] = 0
    mask[2, :5] = 0
    if holes:
        mask[0, 3:6] = 0  # padding inside a row: no prefill plan computes it, a one-query step does
    return ids.masked_fill(mask == 0, 0), mask


def decode_logits(model, impl: str, ids, mask, steps: int = 3, **forward):
    """Teacher-forced decode steps after a prefill: the logits of each one-token step."""
    model.set_attn_implementation(impl)
    out = []
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True, **forward)
        for step in range(steps):
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            token = torch.full((ids.shape[0], 1), 7 + step)
            out.append(model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True, **forward).logits)
    return torch.cat(out, dim=1)


def test_decode_steps_take_one_row_pages_without_a_host_build(calls):
    model, (ids, mask) = model_of(), batch()
    ours = decode_logits(model, "attn_dispatch", ids, mask)
    stats = integration.stats
    assert (stats.builds, stats.device_builds, stats.paged_plans) == (1, 3, 3)  # the prefill's build only
    assert calls.fwd == 4 * 2
    torch.testing.assert_close(ours.float(), decode_logits(model, "sdpa", ids, mask).float(), atol=2e-2, rtol=2e-2)


def test_a_hole_in_a_row_is_exact_in_decode_steps(calls):
    """The prefill of a row with a hole falls back to sdpa; its decode steps see exactly the mask's keys."""
    model, (ids, mask) = model_of(), batch(holes=True)
    ours = decode_logits(model, "attn_dispatch", ids, mask)
    assert integration.stats.paged_plans == 3 and calls.fwd == 3 * 2  # prefill: sdpa
    torch.testing.assert_close(ours.float(), decode_logits(model, "sdpa", ids, mask).float(), atol=2e-2, rtol=2e-2)


def test_sliding_window_and_softcap_decode_match_eager(calls):
    """Gemma-2 style, window 4 over 12+ tokens: the window lives in the page table, FA3 runs without one."""
    model, (ids, mask) = model_of(Gemma2Config, head_dim=16, sliding_window=4, attn_logit_softcapping=5.0), batch(holes=True)
    ours = decode_logits(model, "attn_dispatch", ids, mask)
    assert integration.stats.paged_plans == 3 * 2  # per step: the sliding mask's plan and the full one's
    torch.testing.assert_close(ours.float(), decode_logits(model, "eager", ids, mask).float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("static_offset", [False, True])
def test_visible_keys_are_the_mask_rows(window, static_offset):
    """key_rows/key_counts against the 4D rule a one-query step's mask row follows."""
    from types import SimpleNamespace

    padding = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 0], [1, 0, 1, 0, 1, 1, 1, 1]], dtype=torch.bool)
    query = 5  # keys after it are unwritten (a StaticCache of 8 slots)
    record = SimpleNamespace(
        batch=2, kv_length=8, kv_offset=0, mask=padding, padding=padding, window=window,
        q_offset=torch.tensor(query) if static_offset else query,
    )  # fmt: skip
    rows, counts = decode.visible_keys(record)
    for b in range(2):
        expected = [j for j in range(8) if padding[b, j] and j <= query and (window is None or j > query - window)]
        assert counts[b].item() == len(expected)
        assert rows[b, : len(expected)].tolist() == expected


@pytest.mark.parametrize("window", [None, 3, 1500])
@pytest.mark.parametrize("static_offset", [False, True])
@pytest.mark.parametrize("kv_offset", [0, 2])
@pytest.mark.parametrize("padded", [True, False])
def test_fused_page_table_is_the_torch_one(window, static_offset, kv_offset, padded):
    """attn_dispatch_flash.pages (one Triton launch) makes the bytes visible_keys + page_table make,
    over more than one of its blocks of keys (interpreted on CPU)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 (the GPU runs the cuda-marked twin)")
    check_fused_page_table("cpu", window, static_offset, kv_offset, padded)


@pytest.mark.cuda
@pytest.mark.parametrize("window", [None, 1500])
@pytest.mark.parametrize("static_offset", [False, True])
@pytest.mark.parametrize("padded", [True, False])
def test_fused_page_table_is_the_torch_one_on_the_gpu(window, static_offset, padded):
    """The same on the GPU, through the bound launch: twice, so the second call reuses the binding with
    other lengths and offsets (they are not specialized on)."""
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU")
    check_fused_page_table("cuda", window, static_offset, 0, padded)
    check_fused_page_table("cuda", window, static_offset, 3, padded, length_extra=57)
    # device given as plain "cuda" (no index): the launch takes the current device's stream
    check_fused_page_table("cuda", window, static_offset, 0, padded, kernel_device=torch.device("cuda"))


def check_fused_page_table(device, window, static_offset, kv_offset, padded, length_extra=300, kernel_device=None):
    pages_kernel = pytest.importorskip("attn_dispatch_flash.pages")
    from types import SimpleNamespace

    batch, length = 3, pages_kernel.BLOCK + length_extra
    generator = torch.Generator().manual_seed(length)
    padding = torch.rand(batch, kv_offset + length + 1, generator=generator) > 0.3
    padding[1, : kv_offset + 700] = False  # a left-padded row
    padding = padding.to(device)
    query = kv_offset + length - 40  # the last keys unwritten (a StaticCache)
    record = SimpleNamespace(
        batch=batch, kv_length=length, kv_offset=kv_offset, mask=padding, padding=padding if padded else None,
        window=window, q_offset=torch.tensor(query, device=device) if static_offset else query,
    )  # fmt: skip
    rows, counts = decode.visible_keys(record)
    expected = decode.page_table(rows, kv_heads=2, kv_length=length)
    expected[torch.arange(length, device=device) >= counts[:, None]] = 0  # past each row's count: zeros
    table, fused_counts = pages_kernel.one_query_pages(
        record.padding, batch=batch, length=length, key_offset=kv_offset, query=record.q_offset, window=window,
        page_step=2 * length, device=kernel_device or padding.device,
    )  # fmt: skip
    assert torch.equal(fused_counts, counts)
    assert torch.equal(table, expected)


def test_pages_address_the_cache_in_place():
    cache = torch.randn(2, 3, 5, 8)  # [B, H_kv, K, D]
    pages = decode.paged_keys(cache)
    keys = [[4, 0], [2, 1]]  # each row's visible keys, in the order FA3 reads them
    table = decode.page_table(torch.tensor(keys, dtype=torch.int32), kv_heads=3, kv_length=5)
    for b, row in enumerate(keys):
        for slot, j in enumerate(row):
            assert torch.equal(pages[table[b, slot], 0], cache[b, :, j])  # every head of key j of row b
    assert decode.paged_keys(cache.transpose(1, 2).contiguous().transpose(1, 2)) is None  # [B, K, H, D] storage


def test_an_op_group_that_cannot_read_pages_answers_with_sdpa_and_says_so(calls, caplog):
    from types import SimpleNamespace

    provider, _ = make_torch_provider()
    ops = attn_dispatch_cuda_fa3.build_ops(provider)

    def bind_attention(plan, **kwargs):
        run = ops["bind_attention"](plan, **kwargs)
        if plan.page_table is None:
            return run

        def refuse(*args):
            raise RuntimeError("paged KV needs a page size of 128")

        return refuse

    group = SimpleNamespace(**{**ops, "bind_attention": bind_attention})
    integration.use_ops(group)
    try:
        model, (ids, mask) = model_of(), batch()
        with caplog.at_level(logging.WARNING, logger="attn_dispatch"):
            ours = decode_logits(model, "attn_dispatch", ids, mask)
        assert sum("one-row pages refused" in r.message for r in caplog.records) == 1
        assert integration.stats.device_builds == 1 and integration.stats.builds == 3  # host-built after the refusal
    finally:
        transformers_meta._no_padded_plans.pop(id(group), None)
    torch.testing.assert_close(ours.float(), decode_logits(model, "sdpa", ids, mask).float(), atol=2e-2, rtol=2e-2)
