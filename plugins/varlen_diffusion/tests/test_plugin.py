"""Registration through the host: the provider is resolved once at load, and the plugin declines cleanly."""

from __future__ import annotations

import pytest
import torch
from varlen_masks import text_image_mask
from varlen_torch_provider import make_torch_provider

import attn_dispatch
import attn_dispatch_flash as flash_providers
from attn_dispatch.reference import masked as original

NAME = "varlen_diffusion"


def report(ops):
    return next(p for p in ops.plugins if p.name == NAME)


@pytest.fixture
def only_this_plugin(monkeypatch):
    monkeypatch.setenv("ATTN_DISPATCH_PLUGINS", NAME)


def test_sm90_with_a_provider_registers_the_group(monkeypatch, only_this_plugin):
    monkeypatch.setenv("ATTN_DISPATCH_ARCH", "sm90")
    made = []
    monkeypatch.setitem(flash_providers.PROVIDERS, "sgl_kernel", lambda: made.append(1) or make_torch_provider())
    ops = attn_dispatch.load()
    assert report(ops).status == "active" and set(report(ops).ops) == {"build_mask_meta", "masked_attention"}
    assert made == [1]  # probed once, at load
    note = ops.resolutions["masked_attention"].note
    assert "torch_varlen" in note and "kv_pack" in note
    assert ops.resolutions["build_mask_meta"].plugin == NAME

    # The machine has no GPU: CPU tensors take the original path, unchanged.
    mask = text_image_mask([2, 3], text=4, image=4, text_first=True)
    q = torch.randn(2, 8, 2, 16, dtype=torch.bfloat16)
    got = ops.masked_attention(q, q, q, ops.build_mask_meta(mask))
    assert torch.equal(got, original.masked_attention(q, q, q, original.build_mask_meta(mask)))


def test_strategy_setting_is_read_at_load(monkeypatch, only_this_plugin):
    monkeypatch.setenv("ATTN_DISPATCH_ARCH", "sm90")
    monkeypatch.setenv("ATTN_DISPATCH_VARLEN_DIFFUSION_STRATEGY", "qkv_pack")
    monkeypatch.setitem(flash_providers.PROVIDERS, "sgl_kernel", make_torch_provider)
    assert "general masks: qkv_pack" in attn_dispatch.load().resolutions["masked_attention"].note


def test_sm90_without_a_provider_is_a_missing_dependency(monkeypatch, only_this_plugin):
    monkeypatch.setenv("ATTN_DISPATCH_ARCH", "sm90")
    for name in flash_providers.FA3_ORDER:
        monkeypatch.setitem(flash_providers.PROVIDERS, name, lambda: (_ for _ in ()).throw(ImportError("absent")))
    ops = attn_dispatch.load()
    assert report(ops).status == "missing-dependency" and "absent" in report(ops).reason
    assert ops.resolutions["masked_attention"].plugin == "reference"


def test_sm100_needs_fa4(monkeypatch, only_this_plugin):
    monkeypatch.setenv("ATTN_DISPATCH_ARCH", "sm100")
    monkeypatch.setitem(flash_providers.PROVIDERS, "fa4", make_torch_provider)  # an FA3-versioned stand-in
    assert report(attn_dispatch.load()).status == "missing-dependency"


def test_other_archs_never_register(monkeypatch, only_this_plugin):
    monkeypatch.setenv("ATTN_DISPATCH_ARCH", "sm80")
    assert report(attn_dispatch.load()).status == "not-this-arch"
