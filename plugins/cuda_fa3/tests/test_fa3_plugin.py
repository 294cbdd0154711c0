"""CPU: the plugin through attn_dispatch.load() on a simulated sm90/sm100, with a torch provider installed
as a named FlashAttention provider."""

from __future__ import annotations

import pytest
import torch
import attn_dispatch_flash as flash_providers
from attn_dispatch import PluginLoadError, load, reference
from attn_dispatch.cli import format_info
from attn_dispatch_cuda_fa3 import AttentionOutOps, stats
from fa3_batches import paged_batch
from fa3_torch_provider import make_torch_provider


def install_provider(monkeypatch, **options):
    provider, calls = make_torch_provider(**options)
    monkeypatch.setitem(flash_providers.PROVIDERS, "torch_fa3", lambda: provider)
    monkeypatch.setenv("ATTN_DISPATCH_CUDA_FA3_PROVIDER", "torch_fa3")
    return provider, calls


def report(ops):
    return next(p for p in ops.plugins if p.name == "cuda_fa3")


def test_registers_the_attention_out_group_over_the_probed_provider(monkeypatch):
    provider, calls = install_provider(monkeypatch)
    monkeypatch.setenv("ATTN_DISPATCH_ARCH", "sm90")
    ops = load(refresh=True)
    assert report(ops).status == "active"
    assert set(report(ops).ops) == {"make_attention_plan", "paged_attention_out", "varlen_attention_out", "bind_attention"}
    for op in report(ops).ops:
        resolution = ops.resolutions[op]
        assert resolution.plugin == "cuda_fa3"
        assert resolution.note.startswith("torch_fa3 (FA3: out=, scheduler metadata)")
        assert "writes into out (0 copies)" in resolution.note
    assert isinstance(ops.paged_attention_out.__self__, AttentionOutOps)
    assert "torch_fa3" in format_info(ops)

    # the resolved ops run (on CPU tensors here) and match the original path's reference
    batch = paged_batch(q_lens=[1, 3], k_lens=[17, 40], heads=4, kv_heads=2, head_dim=32)
    plan = ops.make_attention_plan(**batch.plan_args)
    out, want = batch.out(), batch.out()
    ops.paged_attention_out(batch.q, batch.k_cache, batch.v_cache, out, plan=plan)
    reference.paged_attention_out(batch.q, batch.k_cache, batch.v_cache, want, plan=reference.make_attention_plan(**batch.plan_args))
    assert torch.equal(out, want)
    assert calls.metadata == 1 and calls.fwd_with_metadata == 1


def test_copying_provider_is_named_in_the_note(monkeypatch):
    install_provider(monkeypatch, writes_out=False)
    monkeypatch.setenv("ATTN_DISPATCH_ARCH", "sm90")
    note = load(refresh=True).resolutions["paged_attention_out"].note
    assert "1 copy into out per call (counted: attn_dispatch_cuda_fa3.stats.out_copies)" in note
    assert stats.out_copies == 0


def test_original_path_setting(monkeypatch):
    install_provider(monkeypatch)
    monkeypatch.setenv("ATTN_DISPATCH_ARCH", "sm90")
    monkeypatch.setenv("ATTN_DISPATCH_CUDA_FA3_PATH", "original")
    ops = load(refresh=True)
    assert "original path" in ops.resolutions["paged_attention_out"].note
    batch = paged_batch(q_lens=[1], k_lens=[9], heads=4, kv_heads=2, head_dim=32)
    assert ops.make_attention_plan(**batch.plan_args).metadata == {}


def test_unreadable_path_setting_is_warned_and_the_default_kept(monkeypatch, caplog):
    """The host's settings model: one warning and the default; under strict mode, an error."""
    install_provider(monkeypatch)
    monkeypatch.setenv("ATTN_DISPATCH_ARCH", "sm90")
    monkeypatch.setenv("ATTN_DISPATCH_CUDA_FA3_PATH", "fast")
    ops = load(refresh=True)
    assert report(ops).status == "active"
    assert "original path" not in ops.resolutions["paged_attention_out"].note
    assert "ATTN_DISPATCH_CUDA_FA3_PATH='fast' is unreadable" in caplog.text
    monkeypatch.setenv("ATTN_DISPATCH_STRICT", "1")
    with pytest.raises(PluginLoadError, match="ATTN_DISPATCH_CUDA_FA3_PATH"):
        load(refresh=True)


@pytest.mark.parametrize(
    "arch,expected",
    [
        ("sm90", "install sglang-kernel>=0.4.10 or vllm: no FlashAttention provider importable (sgl_kernel:"),
        ("sm100", "flash-attn-4 not installed (FA3's kernels are Hopper-only): no FlashAttention provider importable (fa4:"),
    ],
)
def test_no_provider_is_a_missing_dependency_with_the_reason(monkeypatch, arch, expected):
    for name in flash_providers.PROVIDERS:  # whatever this machine has installed, make every probe fail
        monkeypatch.setitem(flash_providers.PROVIDERS, name, _not_installed(name))
    monkeypatch.setenv("ATTN_DISPATCH_ARCH", arch)
    ops = load(refresh=True)
    assert report(ops).status == "missing-dependency"
    assert report(ops).reason.startswith(expected)
    assert ops.paged_attention_out is reference.paged_attention_out


def test_other_archs_never_ask_the_plugin(monkeypatch):
    monkeypatch.setenv("ATTN_DISPATCH_ARCH", "sm80")
    assert report(load(refresh=True)).status == "not-this-arch"


def test_probe_orders():
    assert flash_providers.probe_order("sm90") == ("sgl_kernel", "vllm_fa3", "flash_attn_interface")
    assert flash_providers.probe_order("sm100") == ("fa4",)


def _not_installed(name):
    def factory():
        raise ImportError(f"No module named {name!r}")

    return factory
