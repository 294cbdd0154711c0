"""GPU tests: ``cuda`` on an NVIDIA GPU (the plugin's torch glue under ATTN_DISPATCH_ARCH=gfx950),
``rocm`` on a real gfx950. The profiler shows the original's cat kernel and the cat-skip's absence of one."""

import importlib.machinery
import re
import sys
import types

import pytest
import torch
from nsa_helpers import hand_off, original_hand_off, q_cat

import attn_dispatch

COPY_KERNEL = re.compile(r"copy|memcpy|catarray|concat", re.IGNORECASE)
needs_nvidia = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.version.cuda), reason="needs an NVIDIA GPU"
)
needs_gfx950 = pytest.mark.skipif(
    not (torch.cuda.is_available() and getattr(torch.version, "hip", None)
         and torch.cuda.get_device_properties(0).gcnArchName.startswith("gfx950")),
    reason="needs an MI355X (gfx950)",
)


@pytest.fixture
def ops(monkeypatch, request):
    if request.param == "simulated":
        monkeypatch.setenv("ATTN_DISPATCH_ARCH", "gfx950")
        fake_aiter = types.ModuleType("aiter")  # the plugin requires aiter; the cat-skip never calls it
        fake_aiter.__spec__ = importlib.machinery.ModuleSpec("aiter", None)
        monkeypatch.setitem(sys.modules, "aiter", fake_aiter)
    return attn_dispatch.load(refresh=True)


def device_kernels(fn) -> list[str]:
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [kernel.name for event in prof.events() for kernel in event.kernels]


def check_cat_skip(ops, tokens, heads):
    assert ops.resolutions["mla_decode_query"].plugin == "rocm_nsa"
    for scaling in (None, 0.5):
        q_original, q_optimized = q_cat(tokens, heads, device="cuda"), q_cat(tokens, heads, device="cuda")
        original = original_hand_off(q_original, decode_impl="tilelang", llama_4_scaling=scaling)
        optimized = hand_off(ops.mla_query_for_backend, ops.mla_decode_query, q_optimized, decode_impl="tilelang", llama_4_scaling=scaling)
        for a, b in zip(original, optimized, strict=True):
            assert torch.equal(a, b)
        assert torch.equal(q_original, q_optimized)
    q = q_cat(tokens, heads, device="cuda")
    original_kernels = device_kernels(lambda: original_hand_off(q, decode_impl="tilelang"))
    optimized_kernels = device_kernels(
        lambda: hand_off(ops.mla_query_for_backend, ops.mla_decode_query, q, decode_impl="tilelang")
    )
    print(f"\nB={tokens} H={heads}\n  original kernels: {original_kernels}\n  cat-skip kernels: {optimized_kernels}")
    assert [k for k in original_kernels if COPY_KERNEL.search(k)], "the original's cat kernel was not seen"
    assert optimized_kernels == []  # views only: nothing runs on the device


@pytest.mark.cuda
@needs_nvidia
@pytest.mark.parametrize("ops", ["simulated"], indirect=True)
@pytest.mark.parametrize("tokens, heads", [(1, 16), (256, 16), (2048, 64)])
def test_cuda_cat_skip_is_byte_identical_and_launches_nothing(ops, tokens, heads):
    check_cat_skip(ops, tokens, heads)


@pytest.mark.rocm
@needs_gfx950
@pytest.mark.parametrize("ops", ["detected"], indirect=True)
@pytest.mark.parametrize("tokens, heads", [(1, 16), (256, 16), (2048, 64)])
def test_rocm_cat_skip_is_byte_identical_and_launches_nothing(ops, tokens, heads):
    assert ops.hardware.arch == "gfx950"
    check_cat_skip(ops, tokens, heads)
