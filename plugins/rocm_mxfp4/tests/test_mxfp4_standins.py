"""The stand-ins implement aiter's MXFP4 / fp8 contract: checked against values computed by hand."""

import aiter_standins as aiter
import pytest
import torch


def block(*values: float) -> torch.Tensor:
    """One 32-element MXFP4 block: the given values, then zeros."""
    return torch.tensor(list(values) + [0.0] * (32 - len(values)), dtype=torch.float32)


def test_elements_round_to_nearest_even_and_pack_low_nibble_first():
    # amax 6 -> scale 2**0 (E8M0 127); ties go to the even code: 0.25->0, 0.75->1.0, 1.25->1.0,
    # 1.75->2.0, 2.5->2.0, 3.5->4.0, 5->4.0; 6 is code 7; -0.5 is 0b1001, -3 is 0b1101.
    packed, scales = aiter.mxfp4_quantize(block(0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.5, -3.0))
    assert scales.tolist() == [127]
    assert packed[:5].tolist() == [0x20, 0x42, 0x64, 0x76, 0xD9]
    assert packed[5:].tolist() == [0] * 11


@pytest.mark.parametrize(
    "amax, expected_scale",
    [
        (6.0, 127),  # 6 -> rounded to 4 -> e = 2 - 2 = 0
        (1.0, 125),  # e = 0 - 2 = -2
        (1.74, 125),  # mantissa below 1.75: not rounded up
        (1.75, 126),  # rounded up to 2 -> e = -1
        (7.0, 128),  # rounded up to 8 -> e = 1
        (0.0, 0),  # log2(0) -> clamped to -127
        (2.0**-130, 0),  # fp32 subnormal: clamped to -127
        (2.0**127, 252),  # e = 127 - 2
    ],
)
def test_shared_scale_is_aiters_even_rounding(amax, expected_scale):
    _, scales = aiter.mxfp4_quantize(block(amax))
    assert scales.tolist() == [expected_scale]


def test_values_past_six_saturate_and_negative_zero_keeps_its_sign():
    # amax 6.8: mantissa 1.7 < 1.75, scale stays 2**0, so 6.8 saturates to 6 (code 7).
    packed, scales = aiter.mxfp4_quantize(block(6.8, -0.1))
    assert scales.tolist() == [127]
    assert packed[0].item() == 0x87  # low nibble 7 (6.0), high nibble 8 (-0.0)


def test_scaled_block_dequantizes_to_hand_computed_values():
    # amax 7 -> scale 2**1: 7/2 = 3.5 rounds to 4 -> 8.0; 3/2 = 1.5 -> 3.0; 0.75/2 = 0.375 -> 0.5 -> 1.0.
    x = block(7.0, 3.0, 0.75, -1.0)
    restored = aiter.mxfp4_dequantize(*aiter.mxfp4_quantize(x))
    assert restored[:4].tolist() == [8.0, 3.0, 1.0, -1.0]


def test_grid_values_round_trip_exactly_at_any_scale():
    grid = torch.tensor(aiter.E2M1_VALUES + tuple(-v for v in aiter.E2M1_VALUES), dtype=torch.float32)
    for power in (-20, -3, 0, 5, 40):
        x = torch.cat([grid, grid]) * 2.0**power  # 32 values, amax 6 * 2**power
        restored = aiter.mxfp4_dequantize(*aiter.mxfp4_quantize(x))
        assert torch.equal(restored, x)


def test_e8m0_255_dequantizes_to_nan():
    restored = aiter.mxfp4_dequantize(torch.zeros(16, dtype=torch.uint8), torch.tensor([255], dtype=torch.uint8))
    assert torch.isnan(restored).all()


def test_batched_gemm_honours_y_strides_and_matches_dequantized_math():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 64, generator=gen).to(torch.bfloat16)
    w, w_scales = aiter.random_mxfp4_weights(4, 32, 64, generator=gen)
    contiguous = aiter.batched_gemm_a16wfp4(x, w, w_scales, torch.bfloat16)
    buf = torch.full((3, 4, 32), float("nan"), dtype=torch.bfloat16)
    aiter.batched_gemm_a16wfp4(x, w, w_scales, torch.bfloat16, buf.transpose(0, 1))
    assert torch.equal(buf.transpose(0, 1), contiguous)
    x_q = aiter.mxfp4_dequantize(*aiter.mxfp4_quantize(x))
    expected = torch.einsum("bmk,bnk->bmn", x_q, aiter.mxfp4_dequantize(w, w_scales))
    torch.testing.assert_close(contiguous.float(), expected, rtol=1e-2, atol=1e-2)


def test_fused_flatten_mxfp4_quant_reads_strided_input_and_returns_column_major_scales():
    x = torch.randn(5, 4, 64, dtype=torch.bfloat16)
    strided = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, (heads, batch) memory order
    values, scales = aiter.fused_flatten_mxfp4_quant(strided)
    expected_values, expected_scales = aiter.mxfp4_quantize(x.reshape(5, 256))
    assert torch.equal(values, expected_values) and torch.equal(scales, expected_scales)
    assert scales.shape == (5, 8) and scales.stride() == (1, 5)


def test_fused_flatten_fp8_group_quant_scales_each_group_to_fp8_max():
    x = torch.zeros(1, 2, 128)
    x[0, 0, 0], x[0, 1, 5] = 2.0, -448.0 * 3
    values, scales = aiter.fused_flatten_fp8_group_quant(x, group_size=128, dtype_quant=torch.float8_e4m3fn)
    assert values.shape == (1, 256) and values.dtype == torch.float8_e4m3fn
    assert torch.equal(scales, torch.tensor([[2.0, 1344.0]]) / 448.0)
    assert values.float()[0, 0].item() == 448.0 and values.float()[0, 128 + 5].item() == -448.0
    assert values.float().abs().sum().item() == 2 * 448.0
