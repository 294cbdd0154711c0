"""The NSA/DSA cat-skip against the original split-then-concatenate path (CPU)."""

import inspect

import pytest
import torch
from nsa_helpers import KV_LORA_RANK, OpRecorder, hand_off, original_hand_off, q_cat

from attn_dispatch import reference
from attn_dispatch_rocm_nsa import CAT_SKIPPING_DECODE_IMPLS, build_ops, mla_decode_query, mla_query_for_backend


def optimized_hand_off(q, **kwargs):
    return hand_off(mla_query_for_backend, mla_decode_query, q, **kwargs)


def scalings(tokens: int):
    yield None
    yield 0.7
    yield torch.linspace(0.5, 1.5, tokens).to(torch.bfloat16).view(tokens, 1, 1)  # per-token, as llama-4 scaling is


def assert_same(original, optimized):
    for a, b in zip(original, optimized, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.mark.parametrize("decode_impl", sorted(CAT_SKIPPING_DECODE_IMPLS))
@pytest.mark.parametrize("heads", [8, 16, 128])
@pytest.mark.parametrize("tokens", [1, 7, 64, 256])
def test_cat_skip_is_byte_identical_to_the_original_split_path(tokens, heads, decode_impl):
    for scaling in scalings(tokens):
        source = q_cat(tokens, heads, seed=tokens + heads)
        q_original, q_optimized = source.clone(), source.clone()
        original = original_hand_off(q_original, decode_impl=decode_impl, llama_4_scaling=scaling)
        optimized = optimized_hand_off(q_optimized, decode_impl=decode_impl, llama_4_scaling=scaling)
        assert_same(original, optimized)
        assert torch.equal(q_original, q_optimized)  # the in-place scaling touched the same elements
        q_all, q_nope, q_rope = optimized
        assert q_all.data_ptr() == q_optimized.data_ptr() and q_all.is_contiguous()  # zero-copy view
        assert q_nope.data_ptr() == q_all.data_ptr() and q_rope.data_ptr() == q_all[..., KV_LORA_RANK:].data_ptr()


def test_llama_4_scaling_multiplies_only_the_nope_channels_in_place():
    q = q_cat(4, 16)
    before = q.clone()
    q_for_backend, q_rope = mla_query_for_backend(q, None, is_decode=True, decode_impl="tilelang", kv_lora_rank=KV_LORA_RANK, llama_4_scaling=2.0)
    assert q_for_backend is q and q_rope is None
    assert torch.equal(q[..., :KV_LORA_RANK], before[..., :KV_LORA_RANK] * 2.0)
    assert torch.equal(q[..., KV_LORA_RANK:], before[..., KV_LORA_RANK:])


@pytest.mark.parametrize("decode_impl", sorted(CAT_SKIPPING_DECODE_IMPLS))
def test_cat_skip_launches_no_copy_or_cat(decode_impl):
    q_original, q_optimized = q_cat(64, 16), q_cat(64, 16)
    with OpRecorder() as original:
        original_hand_off(q_original, decode_impl=decode_impl)
    with OpRecorder() as optimized:
        optimized_hand_off(q_optimized, decode_impl=decode_impl)
    assert original.copies() == ["cat"]
    assert optimized.copies() == []
    with OpRecorder() as scaled:
        optimized_hand_off(q_optimized, decode_impl=decode_impl, llama_4_scaling=0.5)
    assert scaled.copies() == [] and "mul_" in scaled.ops


@pytest.mark.parametrize(
    "decode_impl, is_decode",
    [("flashmla_sparse", True), ("fa3", True), ("tilelang", False), ("aiter", False)],
)
def test_other_impls_and_prefill_keep_the_original_path(decode_impl, is_decode):
    scaling = torch.full((32, 1, 1), 1.25, dtype=torch.bfloat16)
    q_original, q_optimized = q_cat(32, 16), q_cat(32, 16)
    expected = reference.mla_query_for_backend(q_original, None, is_decode=is_decode, decode_impl=decode_impl, kv_lora_rank=KV_LORA_RANK, llama_4_scaling=scaling)
    got = mla_query_for_backend(q_optimized, None, is_decode=is_decode, decode_impl=decode_impl, kv_lora_rank=KV_LORA_RANK, llama_4_scaling=scaling)
    assert got[1] is not None  # the split form
    assert_same(expected, got)
    assert torch.equal(q_original, q_optimized)
    if is_decode:
        assert_same(
            reference.mla_decode_query(*expected, num_heads=16, kv_lora_rank=KV_LORA_RANK, decode_impl=decode_impl),
            mla_decode_query(*got, num_heads=16, kv_lora_rank=KV_LORA_RANK, decode_impl=decode_impl),
        )


def test_split_inputs_are_concatenated_as_before():
    q_nope, q_rope = q_cat(8, 16)[..., :KV_LORA_RANK].contiguous(), q_cat(8, 16, seed=1)[..., KV_LORA_RANK:].contiguous()
    kwargs = dict(is_decode=True, decode_impl="tilelang", llama_4_scaling=0.5)
    expected = reference.mla_query_for_backend(q_nope.clone(), q_rope.clone(), **kwargs)
    got = mla_query_for_backend(q_nope.clone(), q_rope.clone(), **kwargs)
    assert_same(expected, got)
    backend = dict(num_heads=16, kv_lora_rank=KV_LORA_RANK, decode_impl="tilelang")
    with OpRecorder() as recorder:
        q_all, _, _ = mla_decode_query(*got, **backend)
    assert recorder.copies() == ["cat"]
    assert_same(reference.mla_decode_query(*expected, **backend), (q_all,) + tuple(q_all.split([KV_LORA_RANK, 64], -1)))


def test_backend_side_accepts_flat_and_non_contiguous_q_cat():
    q = q_cat(8, 16)
    flat = q.view(8, -1)
    assert_same(mla_decode_query(flat, None, num_heads=16, kv_lora_rank=KV_LORA_RANK, decode_impl="aiter"),
                reference.mla_decode_query(flat, None, num_heads=16, kv_lora_rank=KV_LORA_RANK, decode_impl="aiter"))
    strided = q.transpose(0, 1).contiguous().transpose(0, 1)  # same values, (heads, tokens) memory order
    q_all, _, _ = mla_decode_query(strided, None, num_heads=16, kv_lora_rank=KV_LORA_RANK, decode_impl="aiter")
    assert torch.equal(q_all, q) and q_all.is_contiguous()


def test_signatures_match_the_reference():
    assert inspect.signature(mla_query_for_backend) == inspect.signature(reference.mla_query_for_backend)
    assert inspect.signature(mla_decode_query) == inspect.signature(reference.mla_decode_query)
    assert build_ops() == {"mla_query_for_backend": mla_query_for_backend, "mla_decode_query": mla_decode_query}


@pytest.mark.parametrize(
    "call, arg",
    [
        (lambda q: mla_query_for_backend(q, None, is_decode=True, decode_impl="tilelang"), "kv_lora_rank"),
        (lambda q: mla_query_for_backend(q, None, is_decode=True, decode_impl="tilelang", kv_lora_rank=576), "kv_lora_rank"),
        (lambda q: mla_query_for_backend(q[0], None, is_decode=True, decode_impl="tilelang", kv_lora_rank=512), "q"),
        (lambda q: mla_query_for_backend(q, None, is_decode=False, decode_impl="tilelang"), "kv_lora_rank"),
        (lambda q: mla_query_for_backend(q, q[..., :64].float(), is_decode=True, decode_impl="tilelang"), "q_rope"),
        (lambda q: mla_decode_query(q, None, num_heads=7, kv_lora_rank=512, decode_impl="aiter"), "q"),
        (lambda q: mla_decode_query(q, None, num_heads=16, kv_lora_rank=576, decode_impl="aiter"), "kv_lora_rank"),
        (lambda q: mla_decode_query(q[0, 0], None, num_heads=16, kv_lora_rank=512, decode_impl="aiter"), "q"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument_before_any_write(call, arg):
    q = q_cat(4, 16)
    before = q.clone()
    with pytest.raises(ValueError, match=f"^{arg}:"):
        call(q)
    assert torch.equal(q, before)


def test_hand_off_compiles_with_fullgraph():
    def step(q, scaling):
        return optimized_hand_off(q, decode_impl="tilelang", llama_4_scaling=scaling)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    q_eager, q_compiled = q_cat(8, 16), q_cat(8, 16)
    assert_same(step(q_eager, 0.5), compiled(q_compiled, 0.5))
    assert torch.equal(q_eager, q_compiled)
