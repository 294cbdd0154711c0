"""The strided-output v-up projection against its original path, on the aiter stand-ins (CPU)."""

import inspect

import aiter_standins as aiter
import pytest
import torch

from attn_dispatch import reference
from attn_dispatch_rocm_mxfp4 import Kernels, build_ops, make_v_up_proj

RANK, V_DIM = 512, 128  # DeepSeek-V3: kv_lora_rank 512, v_head_dim 128
O_PROJ_DTYPES = (torch.uint8, torch.float8_e4m3fn, torch.bfloat16)

KERNELS = aiter.standin_kernels()
STRIDED = make_v_up_proj(KERNELS, strided_output=True)
ORIGINAL = make_v_up_proj(KERNELS, strided_output=False)


def inputs(batch: int, heads: int, weights: str, seed: int = 0, rank: int = RANK, v_dim: int = V_DIM):
    gen = torch.Generator().manual_seed(seed)
    attn_output = torch.randn(batch, heads, rank, generator=gen).to(torch.bfloat16)
    if weights == "mxfp4":
        w_vc, w_vc_scale = aiter.random_mxfp4_weights(heads, v_dim, rank, generator=gen)
        return attn_output, w_vc, w_vc_scale
    w_vc = (torch.randn(heads, rank, v_dim, generator=gen) / rank**0.5).to(torch.bfloat16)
    return attn_output, w_vc, None


def as_tuple(result):
    return result if isinstance(result, tuple) else (result,)


@pytest.mark.parametrize("weights", ["mxfp4", "bf16"])
@pytest.mark.parametrize("heads", [8, 16, 128])
@pytest.mark.parametrize("batch", [1, 7, 64, 256])
def test_strided_path_is_byte_identical_to_original(batch, heads, weights):
    attn_output, w_vc, w_vc_scale = inputs(batch, heads, weights, seed=batch * 1000 + heads)
    for o_proj_dtype in O_PROJ_DTYPES:
        kwargs = dict(w_vc_scale=w_vc_scale, o_proj_weight_dtype=o_proj_dtype)
        original = as_tuple(ORIGINAL(attn_output, w_vc, **kwargs))
        strided = as_tuple(STRIDED(attn_output, w_vc, **kwargs))
        assert len(original) == len(strided)
        for a, b in zip(original, strided):
            assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), f"{o_proj_dtype} differs"


@pytest.mark.parametrize("weights", ["mxfp4", "bf16"])
def test_output_shapes_per_o_proj_dtype(weights):
    batch, heads = 7, 16
    attn_output, w_vc, w_vc_scale = inputs(batch, heads, weights)
    flat = STRIDED(attn_output, w_vc, w_vc_scale=w_vc_scale)
    assert flat.shape == (batch, heads * V_DIM) and flat.dtype == torch.bfloat16 and flat.is_contiguous()
    assert flat._base is not None and flat._base.shape == (batch, heads, V_DIM)  # a view of buf
    fp4, fp4_scales = STRIDED(attn_output, w_vc, w_vc_scale=w_vc_scale, o_proj_weight_dtype=torch.uint8)
    assert fp4.shape == (batch, heads * V_DIM // 2) and fp4_scales.shape == (batch, heads * V_DIM // 32)
    fp8, fp8_scales = STRIDED(attn_output, w_vc, w_vc_scale=w_vc_scale, o_proj_weight_dtype=torch.float8_e4m3fn)
    assert fp8.shape == (batch, heads * V_DIM) and fp8_scales.shape == (batch, heads * V_DIM // 128)


def test_bf16_weights_match_the_hosts_reference_bytes():
    attn_output, w_vc, _ = inputs(64, 16, "bf16")
    assert torch.equal(STRIDED(attn_output, w_vc), reference.mla_v_up_proj(attn_output, w_vc))


def test_mxfp4_weights_are_read_as_heads_vdim_packed_rank():
    attn_output, w_vc, w_vc_scale = inputs(5, 8, "mxfp4")
    x_q = aiter.mxfp4_dequantize(*aiter.mxfp4_quantize(attn_output))
    expected = torch.einsum("bhk,hvk->bhv", x_q, aiter.mxfp4_dequantize(w_vc, w_vc_scale)).flatten(1, 2)
    torch.testing.assert_close(STRIDED(attn_output, w_vc, w_vc_scale=w_vc_scale).float(), expected, rtol=1e-2, atol=1e-2)


def test_glm5_like_v_dim_256_is_byte_identical():
    attn_output, w_vc, w_vc_scale = inputs(9, 8, "mxfp4", v_dim=256)
    for o_proj_dtype in O_PROJ_DTYPES:
        kwargs = dict(w_vc_scale=w_vc_scale, o_proj_weight_dtype=o_proj_dtype)
        for a, b in zip(as_tuple(ORIGINAL(attn_output, w_vc, **kwargs)), as_tuple(STRIDED(attn_output, w_vc, **kwargs))):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


# --- what each path launches ---------------------------------------------------------------------------

METADATA_OPS = {"empty", "transpose", "view", "_unsafe_view"}


def launches(op, *args, **kwargs) -> aiter.LaunchRecorder:
    with aiter.LaunchRecorder() as recorder:
        op(*args, **kwargs)
    return recorder


@pytest.mark.parametrize("weights", ["mxfp4", "bf16"])
@pytest.mark.parametrize("o_proj_dtype", O_PROJ_DTYPES)
def test_strided_path_launches_no_copy(weights, o_proj_dtype):
    attn_output, w_vc, w_vc_scale = inputs(32, 16, weights)
    strided = launches(STRIDED, attn_output, w_vc, w_vc_scale=w_vc_scale, o_proj_weight_dtype=o_proj_dtype)
    original = launches(ORIGINAL, attn_output, w_vc, w_vc_scale=w_vc_scale, o_proj_weight_dtype=o_proj_dtype)
    assert strided.copies() == []
    work = [name for name in strided.launches if name not in METADATA_OPS]
    gemm = "aiter.batched_gemm_a16wfp4" if weights == "mxfp4" else "bmm"
    quant = {torch.uint8: ["aiter.fused_flatten_mxfp4_quant"], torch.float8_e4m3fn: ["aiter.fused_flatten_fp8_group_quant"]}
    assert work == [gemm] + quant.get(o_proj_dtype, [])
    if o_proj_dtype == torch.bfloat16:
        # The original's flatten of the transposed (heads, batch, v) result is a copy (aten clone).
        assert original.copies() == ["clone"]
    else:
        # The original's fused quant already reads y strided: no copy there either, only scattered reads.
        assert original.copies() == []


# --- contract: signature, bad input, compile -------------------------------------------------------------


def test_signature_matches_the_reference():
    assert inspect.signature(STRIDED) == inspect.signature(reference.mla_v_up_proj)
    assert inspect.signature(ORIGINAL) == inspect.signature(reference.mla_v_up_proj)


def test_build_ops_registers_the_strided_path():
    ops = build_ops(KERNELS)
    assert set(ops) == {"mla_v_up_proj"} and ops["mla_v_up_proj"].__name__ == "mla_v_up_proj_strided"


def never_called(*args, **kwargs):
    raise AssertionError("a kernel ran before the inputs were checked")


UNREACHABLE = Kernels(never_called, never_called, never_called, provider="none")


def bad_calls():
    a, w8, s8 = inputs(4, 8, "mxfp4")
    _, wbf, _ = inputs(4, 8, "bf16")
    yield "attn_output", (a[0], w8), dict(w_vc_scale=s8)
    yield "attn_output", (a.to(torch.int32), w8), dict(w_vc_scale=s8)
    yield "attn_output", (a.float(), w8), dict(w_vc_scale=s8)  # aiter's GEMM takes bf16/fp16 activations
    yield "w_vc_scale", (a, w8), {}
    yield "w_vc", (a, w8[:, :, :-1]), dict(w_vc_scale=s8)
    yield "w_vc", (a, w8[:4]), dict(w_vc_scale=s8)
    yield "w_vc_scale", (a, w8), dict(w_vc_scale=s8[..., :-1])
    yield "w_vc_scale", (a, w8), dict(w_vc_scale=s8.to(torch.int32))
    yield "w_vc_scale", (a, wbf), dict(w_vc_scale=s8)
    yield "w_vc", (a, wbf.half()), {}
    yield "w_vc", (a, wbf[:, :-1]), {}
    yield "o_proj_weight_dtype", (a, wbf), dict(o_proj_weight_dtype="uint8")
    yield "w_vc", (a, wbf[..., :96]), dict(o_proj_weight_dtype=torch.uint8)  # v_dim not a power of two
    yield "w_vc", (a, wbf[..., :64]), dict(o_proj_weight_dtype=torch.float8_e4m3fn)  # v_dim below a group


@pytest.mark.parametrize("arg, args, kwargs", list(bad_calls()))
def test_bad_input_raises_value_error_naming_the_argument_before_any_kernel(arg, args, kwargs):
    for strided_output in (True, False):
        op = make_v_up_proj(UNREACHABLE, strided_output=strided_output)
        with pytest.raises(ValueError, match=f"^{arg}:"):
            op(*args, **kwargs)


def test_bf16_path_compiles_with_fullgraph():
    attn_output, w_vc, _ = inputs(8, 16, "bf16")
    compiled = torch.compile(STRIDED, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(attn_output, w_vc), STRIDED(attn_output, w_vc))
