"""How the host finds, declines or activates rocm_nsa (simulated arch)."""

import importlib.machinery
import sys
import types

import pytest
import torch
from nsa_helpers import KV_LORA_RANK, hand_off, original_hand_off, q_cat

import attn_dispatch
from attn_dispatch import reference


def load_on(monkeypatch, arch: str) -> attn_dispatch.Ops:
    monkeypatch.setenv("ATTN_DISPATCH_ARCH", arch)
    return attn_dispatch.load(refresh=True)


def report(ops: attn_dispatch.Ops) -> attn_dispatch.PluginReport:
    return next(p for p in ops.plugins if p.name == "rocm_nsa")


def test_aiter_missing_on_gfx950_is_missing_dependency(monkeypatch):
    monkeypatch.setitem(sys.modules, "aiter", None)  # import aiter -> ImportError, even where it is installed
    ops = load_on(monkeypatch, "gfx950")
    assert (report(ops).status, report(ops).reason) == ("missing-dependency", "aiter not installed")
    assert ops.mla_decode_query is reference.mla_decode_query


def test_active_on_gfx950_with_aiter(monkeypatch):
    fake_aiter = types.ModuleType("aiter")
    fake_aiter.__spec__ = importlib.machinery.ModuleSpec("aiter", None)
    monkeypatch.setitem(sys.modules, "aiter", fake_aiter)
    ops = load_on(monkeypatch, "gfx950")
    assert report(ops).status == "active"
    assert report(ops).ops == ("mla_query_for_backend", "mla_decode_query")
    assert ops.resolutions["mla_decode_query"].plugin == "rocm_nsa"

    q_original, q_optimized = q_cat(16, 16), q_cat(16, 16)
    expected = original_hand_off(q_original, decode_impl="aiter", llama_4_scaling=0.5)
    q_all, q_nope, q_rope = hand_off(ops.mla_query_for_backend, ops.mla_decode_query, q_optimized, decode_impl="aiter", llama_4_scaling=0.5)
    assert q_all.data_ptr() == q_optimized.data_ptr()
    for a, b in zip(expected, (q_all, q_nope, q_rope)):
        assert torch.equal(a, b)
    assert q_nope.shape[-1] == KV_LORA_RANK


@pytest.mark.parametrize("arch", ["gfx942", "sm90", "cpu"])
def test_other_archs_are_not_this_arch(monkeypatch, arch):
    ops = load_on(monkeypatch, arch)
    assert report(ops).status == "not-this-arch" and "gfx950" in report(ops).reason
    assert ops.mla_query_for_backend is reference.mla_query_for_backend
    assert ops.mla_decode_query is reference.mla_decode_query


def test_switched_off_by_env(monkeypatch):
    monkeypatch.setenv("ATTN_DISPATCH_ROCM_NSA", "0")
    ops = load_on(monkeypatch, "gfx950")
    assert report(ops).status == "disabled-by-env"
    assert ops.mla_decode_query is reference.mla_decode_query
