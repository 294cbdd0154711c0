"""How the host finds, declines or activates rocm_mxfp4 (simulated arch; fake aiter from the stand-ins)."""

import sys
import types

import aiter_standins as aiter
import pytest
import torch

import attn_dispatch
from attn_dispatch import reference


def load_on(monkeypatch, arch: str) -> attn_dispatch.Ops:
    monkeypatch.setenv("ATTN_DISPATCH_ARCH", arch)
    return attn_dispatch.load(refresh=True)


def report(ops: attn_dispatch.Ops) -> attn_dispatch.PluginReport:
    return next(p for p in ops.plugins if p.name == "rocm_mxfp4")


def install_fake_aiter(monkeypatch, without: tuple[str, ...] = ()):
    for name, module in aiter.fake_aiter_modules().items():
        if name not in without:
            monkeypatch.setitem(sys.modules, name, module)


def test_aiter_missing_on_gfx950_is_missing_dependency(monkeypatch):
    monkeypatch.setitem(sys.modules, "aiter", None)  # import aiter -> ImportError, even where it is installed
    ops = load_on(monkeypatch, "gfx950")
    assert (report(ops).status, report(ops).reason) == ("missing-dependency", "aiter not installed")
    assert ops.mla_v_up_proj is reference.mla_v_up_proj


def test_unrelated_pypi_aiter_is_missing_dependency(monkeypatch):
    unrelated = types.ModuleType("aiter")  # PyPI's 'aiter' is another project: no aiter.ops.triton
    monkeypatch.setitem(sys.modules, "aiter", unrelated)
    monkeypatch.setitem(sys.modules, "aiter.ops", None)
    ops = load_on(monkeypatch, "gfx950")
    assert report(ops).status == "missing-dependency"
    assert report(ops).reason.startswith("aiter not installed")


@pytest.mark.parametrize("arch", ["gfx942", "sm90", "cpu"])
def test_other_archs_are_not_this_arch(monkeypatch, arch):
    install_fake_aiter(monkeypatch)
    ops = load_on(monkeypatch, arch)
    assert report(ops).status == "not-this-arch"
    assert "gfx950" in report(ops).reason
    assert ops.mla_v_up_proj is reference.mla_v_up_proj


def test_switched_off_by_env(monkeypatch):
    install_fake_aiter(monkeypatch)
    monkeypatch.setenv("ATTN_DISPATCH_ROCM_MXFP4", "0")
    ops = load_on(monkeypatch, "gfx950")
    assert report(ops).status == "disabled-by-env"
    assert ops.mla_v_up_proj is reference.mla_v_up_proj


def test_active_on_gfx950_with_aiter_registers_the_strided_path(monkeypatch):
    install_fake_aiter(monkeypatch)
    ops = load_on(monkeypatch, "gfx950")
    assert report(ops).status == "active" and report(ops).ops == ("mla_v_up_proj",)
    resolution = ops.resolutions["mla_v_up_proj"]
    assert resolution.plugin == "rocm_mxfp4" and resolution.note == "aiter batched_gemm_a16wfp4"
    assert ops.mla_v_up_proj.__name__ == "mla_v_up_proj_strided"

    gen = torch.Generator().manual_seed(3)
    attn_output = torch.randn(7, 16, 512, generator=gen).to(torch.bfloat16)
    w_vc, w_vc_scale = aiter.random_mxfp4_weights(16, 128, 512, generator=gen)
    with aiter.LaunchRecorder() as recorder:
        values, scales = ops.mla_v_up_proj(attn_output, w_vc, w_vc_scale=w_vc_scale, o_proj_weight_dtype=torch.uint8)
    assert "aiter.batched_gemm_a16wfp4" in recorder.launches and recorder.copies() == []
    assert values.shape == (7, 16 * 128 // 2) and scales.shape == (7, 16 * 128 // 32)


def test_falls_back_to_the_deprecated_pre_quant_gemm(monkeypatch):
    install_fake_aiter(monkeypatch, without=("aiter.ops.triton.batched_gemm_a16wfp4",))
    monkeypatch.setitem(sys.modules, "aiter.ops.triton.batched_gemm_a16wfp4", None)
    pre_quant = types.ModuleType("aiter.ops.triton.batched_gemm_afp4wfp4_pre_quant")
    pre_quant.batched_gemm_afp4wfp4_pre_quant = aiter.batched_gemm_a16wfp4  # same leading arguments
    monkeypatch.setitem(sys.modules, pre_quant.__name__, pre_quant)
    ops = load_on(monkeypatch, "gfx950")
    assert report(ops).status == "active"
    assert ops.resolutions["mla_v_up_proj"].note == "aiter batched_gemm_afp4wfp4_pre_quant"


def test_aiter_without_the_fused_quants_is_missing_dependency(monkeypatch):
    install_fake_aiter(monkeypatch, without=("aiter.ops.triton.fused_fp8_quant",))
    monkeypatch.setitem(sys.modules, "aiter.ops.triton.fused_fp8_quant", None)
    ops = load_on(monkeypatch, "gfx950")
    assert report(ops).status == "missing-dependency"
    assert "fused_flatten_fp8_group_quant" in report(ops).reason
