"""GPU tests. ``cuda``: an NVIDIA GPU, plugin glue under ATTN_DISPATCH_ARCH=gfx950 with the stand-ins.
``rocm``: an MI355X (gfx950) with real aiter. Both skip cleanly elsewhere."""

import importlib.util
import sys

import aiter_standins as aiter
import pytest
import torch

import attn_dispatch
from attn_dispatch import reference
from attn_dispatch_rocm_mxfp4 import aiter_kernels, make_v_up_proj

O_PROJ_DTYPES = (torch.uint8, torch.float8_e4m3fn, torch.bfloat16)


def has_nvidia_gpu() -> bool:
    return torch.cuda.is_available() and torch.version.cuda is not None


def has_gfx950_with_aiter() -> bool:
    if not torch.cuda.is_available() or not getattr(torch.version, "hip", None):
        return False
    if not torch.cuda.get_device_properties(0).gcnArchName.startswith("gfx950"):
        return False
    return importlib.util.find_spec("aiter") is not None


needs_nvidia = pytest.mark.skipif(not has_nvidia_gpu(), reason="needs an NVIDIA GPU")
needs_gfx950_aiter = pytest.mark.skipif(not has_gfx950_with_aiter(), reason="needs an MI355X (gfx950) with aiter")


def inputs(batch, heads, weights, *, rank=512, v_dim=128, seed=0, device="cuda"):
    gen = torch.Generator().manual_seed(seed)
    attn_output = torch.randn(batch, heads, rank, generator=gen).to(torch.bfloat16).to(device)
    if weights == "mxfp4":
        w_vc, w_vc_scale = aiter.random_mxfp4_weights(heads, v_dim, rank, generator=gen, device=device)
        return attn_output, w_vc, w_vc_scale
    w_vc = (torch.randn(heads, rank, v_dim, generator=gen) / rank**0.5).to(torch.bfloat16).to(device)
    return attn_output, w_vc, None


def as_tuple(result):
    return result if isinstance(result, tuple) else (result,)


def assert_same_bytes(original, strided):
    for a, b in zip(as_tuple(original), as_tuple(strided), strict=True):
        assert a.shape == b.shape and a.stride() == b.stride()
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def profile(fn, *args, **kwargs):
    fn(*args, **kwargs)  # warm up: first calls may launch one-off kernels (cuBLAS workspace, ...)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn(*args, **kwargs)
        torch.cuda.synchronize()
    return aiter.kernels_by_origin(prof)


# --- NVIDIA (H200): the glue, on torch.bmm and the torch stand-ins ------------------------------------


@pytest.mark.cuda
@needs_nvidia
@pytest.mark.parametrize("batch", [1, 32, 256, 2048])
@pytest.mark.parametrize("heads, v_dim", [(16, 128), (64, 256)])
def test_cuda_bf16_weights_strided_bmm_is_byte_identical(batch, heads, v_dim):
    kernels = aiter.standin_kernels()
    attn_output, w_vc, _ = inputs(batch, heads, "bf16", v_dim=v_dim, seed=batch)
    strided = make_v_up_proj(kernels)(attn_output, w_vc)
    assert_same_bytes(make_v_up_proj(kernels, strided_output=False)(attn_output, w_vc), strided)
    assert torch.equal(reference.mla_v_up_proj(attn_output, w_vc), strided)


@pytest.mark.cuda
@needs_nvidia
@pytest.mark.parametrize("weights", ["bf16", "mxfp4"])
@pytest.mark.parametrize("o_proj_dtype", O_PROJ_DTYPES)
def test_cuda_profiler_strided_glue_launches_no_copy_kernel(monkeypatch, weights, o_proj_dtype):
    for name, module in aiter.fake_aiter_modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setenv("ATTN_DISPATCH_ARCH", "gfx950")
    ops = attn_dispatch.load(refresh=True)
    assert ops.resolutions["mla_v_up_proj"].plugin == "rocm_mxfp4"
    original = make_v_up_proj(aiter.standin_kernels(), strided_output=False)

    attn_output, w_vc, w_vc_scale = inputs(256, 16, weights)
    kwargs = dict(w_vc_scale=w_vc_scale, o_proj_weight_dtype=o_proj_dtype)
    assert_same_bytes(original(attn_output, w_vc, **kwargs), ops.mla_v_up_proj(attn_output, w_vc, **kwargs))
    strided_glue, strided_standin = profile(ops.mla_v_up_proj, attn_output, w_vc, **kwargs)
    original_glue, _ = profile(original, attn_output, w_vc, **kwargs)
    print(f"\n{weights} w_vc, {o_proj_dtype} o_proj\n  original glue kernels: {original_glue}\n  strided glue kernels:  {strided_glue}")
    assert aiter.copy_kernels(strided_glue) == []
    if weights == "bf16":
        assert len(strided_glue) >= 1  # the bmm itself: proves kernels are attributed at all
    else:
        assert strided_standin, "the stand-in GEMM's kernels were not seen"
    if o_proj_dtype == torch.bfloat16:
        assert aiter.copy_kernels(original_glue), "the original's flatten copy kernel was not seen"


# --- AMD MI355X: real aiter ----------------------------------------------------------------------------


@pytest.mark.rocm
@needs_gfx950_aiter
def test_rocm_plugin_is_active_on_real_hardware():
    ops = attn_dispatch.load(refresh=True)
    assert ops.hardware.arch == "gfx950"
    assert ops.resolutions["mla_v_up_proj"].plugin == "rocm_mxfp4"
    assert ops.resolutions["mla_v_up_proj"].note.startswith("aiter batched_gemm_")


@pytest.mark.rocm
@needs_gfx950_aiter
@pytest.mark.parametrize("weights", ["mxfp4", "bf16"])
@pytest.mark.parametrize("heads", [8, 16, 128])
@pytest.mark.parametrize("batch", [1, 7, 64, 256])
def test_rocm_real_aiter_strided_path_is_byte_identical(batch, heads, weights):
    kernels = aiter_kernels()
    strided, original = make_v_up_proj(kernels), make_v_up_proj(kernels, strided_output=False)
    attn_output, w_vc, w_vc_scale = inputs(batch, heads, weights, seed=batch * 1000 + heads)
    for o_proj_dtype in O_PROJ_DTYPES:
        kwargs = dict(w_vc_scale=w_vc_scale, o_proj_weight_dtype=o_proj_dtype)
        assert_same_bytes(original(attn_output, w_vc, **kwargs), strided(attn_output, w_vc, **kwargs))


@pytest.mark.rocm
@needs_gfx950_aiter
def test_rocm_stand_ins_follow_aiters_contract():
    kernels = aiter_kernels()
    x = torch.randn(64, 16, 128, device="cuda").to(torch.bfloat16)
    for real, standin in zip(kernels.fused_flatten_mxfp4_quant(x), aiter.fused_flatten_mxfp4_quant(x), strict=True):
        assert torch.equal(real, standin)
    real = kernels.fused_flatten_fp8_group_quant(x, group_size=128, dtype_quant=torch.float8_e4m3fn)
    standin = aiter.fused_flatten_fp8_group_quant(x, group_size=128, dtype_quant=torch.float8_e4m3fn)
    assert torch.equal(real[1], standin[1])
    assert torch.equal(real[0].view(torch.uint8), standin[0].view(torch.uint8))
    attn_output, w_vc, w_vc_scale = inputs(32, 16, "mxfp4")
    y_real = kernels.batched_gemm_fp4(attn_output.transpose(0, 1), w_vc, w_vc_scale, torch.bfloat16, None)
    y_standin = aiter.batched_gemm_a16wfp4(attn_output.transpose(0, 1), w_vc, w_vc_scale, torch.bfloat16)
    torch.testing.assert_close(y_real, y_standin, rtol=2e-2, atol=2e-2)  # accumulation order differs


@pytest.mark.rocm
@needs_gfx950_aiter
@pytest.mark.parametrize("o_proj_dtype", O_PROJ_DTYPES)
def test_rocm_profiler_strided_path_launches_no_copy_kernel(o_proj_dtype):
    kernels = aiter_kernels()
    attn_output, w_vc, w_vc_scale = inputs(256, 16, "mxfp4")
    glue, _ = profile(make_v_up_proj(kernels), attn_output, w_vc, w_vc_scale=w_vc_scale, o_proj_weight_dtype=o_proj_dtype)
    assert glue and aiter.copy_kernels(glue) == []
