"""The known-wrong guard (issue 12) on the CPU, with the torch stand-in provider named as the guarded build:
its decision table, the reroute to the dense torch route (right answers, the kernel never called), the log
and counter, strict mode, and the version key that leaves a fixed build alone."""

from __future__ import annotations

import logging

import pytest
import torch
from attn_dispatch.plans import AttentionParams
from attn_dispatch_flash import FlashArgs
from fa3_batches import packed_batch, paged_batch
from fa3_torch_provider import make_torch_provider

from attn_dispatch import reference
from attn_dispatch_cuda_fa3 import KnownWrongConfiguration, build_ops, describe
from attn_dispatch_cuda_fa3 import known_wrong as kw
from attn_dispatch_cuda_fa3.dense import dense_attention
from attn_dispatch_cuda_fa3.stats import stats

LOCAL = AttentionParams(causal=True, window_size=(4, 0))
TWO_SIDED = AttentionParams(causal=False, window_size=(3, 2))


def layer(window=(255, 0), causal=True, max_q=129, max_k=463, heads=(8, 8, 128)) -> kw.Layer:
    return kw.Layer(*heads, causal, window, max_q, max_k)


@pytest.mark.parametrize(
    "name, version, the_layer, guarded",
    [
        ("vllm_fa3", "0.33.0", layer(), True),
        ("vllm_fa3", "0.33.0+cu130", layer(heads=(32, 8, 256)), True),  # any head dim, GQA too
        ("vllm_fa3", "0.32.1", layer(), True),  # older builds: not shown fixed
        ("vllm_fa3", "", layer(), True),  # version unknown: not shown fixed
        ("vllm_fa3", "0.34.0", layer(), False),  # past the last bad version: left on the kernel
        ("sgl_kernel", "0.4.10", layer(), False),  # another provider: not listed
        ("vllm_fa3", "0.33.0", layer(window=(-1, -1)), False),  # no window
        ("vllm_fa3", "0.33.0", layer(max_q=1), False),  # decode: the whole decode grid passed
        ("vllm_fa3", "0.33.0", layer(window=(462, 0)), False),  # reaches every key: FA3 drops the window
        ("vllm_fa3", "0.33.0", layer(window=(461, 0)), True),
        ("vllm_fa3", "0.33.0", layer(window=(-1, 5), causal=False), True),  # a right window bites
        ("vllm_fa3", "0.33.0", layer(window=(-1, 128), causal=False), False),  # ... unless it reaches every key
        ("vllm_fa3", "0.33.0", layer(window=(-1, 5), causal=True), False),  # causal: the right edge is the diagonal
    ],
)
def test_decision_table(name, version, the_layer, guarded):
    provider, _ = make_torch_provider(name=name, version=version)
    assert (kw.find(provider, the_layer) is not None) == guarded


def test_release_ordering():
    assert kw.release("0.33.0+cu130") == (0, 33, 0)
    assert kw.release("0.34.0rc1") == (0, 34, 0) > kw.release("0.33.0")
    assert kw.release("0.9.2") < kw.release("0.33.0")


def _paged_case(params):
    batch = paged_batch(q_lens=[3, 5, 2], k_lens=[9, 5, 14], heads=4, kv_heads=2, head_dim=32, page_size=4)
    expected_out = torch.zeros(batch.tokens + 2, 4 * 32, dtype=torch.bfloat16)  # 2 rows past the batch
    plan = reference.make_attention_plan(**batch.plan_args, layer_params=(params,))
    reference.paged_attention_out(batch.q, batch.k_cache, batch.v_cache, expected_out, plan=plan, params=params)
    return batch, expected_out


@pytest.mark.parametrize("params", [LOCAL, TWO_SIDED], ids=["causal-window", "two-sided"])
def test_guarded_layers_take_the_dense_route_and_answer_right(params, caplog, monkeypatch):
    monkeypatch.setattr(kw, "_warned", set())
    provider, calls = make_torch_provider(name="vllm_fa3", version="0.33.0")
    ops = build_ops(provider)
    batch, expected = _paged_case(params)
    plan = ops["make_attention_plan"](**batch.plan_args, layer_params=(params,))
    out = torch.full_like(expected, 7.0)
    before, fwd_before = stats.guarded_bindings, calls.fwd
    with caplog.at_level(logging.WARNING, logger="attn_dispatch"):
        for _ in range(3):  # later layers look the binding up: one binding, one log line
            ops["paged_attention_out"](batch.q, batch.k_cache, batch.v_cache, out, plan=plan, params=params)
        q, k, v, lengths = packed_batch(lens=[9, 3], heads=4, kv_heads=4, head_dim=32)
        packed_out = torch.zeros(12, 4 * 32, dtype=torch.bfloat16)
        ops["varlen_attention_out"](q, k, v, packed_out, **lengths, params=params)
    assert calls.fwd == fwd_before, "the known-wrong kernel was called"
    assert stats.guarded_bindings == before + 2
    assert caplog.text.count("known-wrong: vllm_fa3 0.33.0") == 1
    assert torch.allclose(out[: batch.tokens].float(), expected[: batch.tokens].float(), atol=2e-2, rtol=2e-2)
    assert torch.equal(out[batch.tokens :], torch.full_like(out[batch.tokens :], 7.0)), "rows past the batch were written"
    expected_packed = torch.zeros_like(packed_out)
    reference.varlen_attention_out(q, k, v, expected_packed, **lengths, params=params)
    assert torch.allclose(packed_out.float(), expected_packed.float(), atol=2e-2, rtol=2e-2)


def test_original_and_optimized_paths_give_the_same_bytes_when_guarded():
    provider, _ = make_torch_provider(name="vllm_fa3", version="0.33.0")
    batch, expected = _paged_case(LOCAL)
    outs = []
    for original in (False, True):
        ops = build_ops(provider, original=original)
        plan = ops["make_attention_plan"](**batch.plan_args, layer_params=(LOCAL,))
        outs.append(torch.zeros_like(expected))
        ops["paged_attention_out"](batch.q, batch.k_cache, batch.v_cache, outs[-1], plan=plan, params=LOCAL)
    assert torch.equal(*outs)


def test_strict_mode_refuses_a_guarded_layer_before_writing():
    provider, calls = make_torch_provider(name="vllm_fa3", version="0.33.0")
    ops = build_ops(provider, strict=True)
    batch, expected = _paged_case(LOCAL)
    plan = ops["make_attention_plan"](**batch.plan_args, layer_params=(LOCAL,))
    out = torch.full_like(expected, 7.0)
    with pytest.raises(KnownWrongConfiguration, match="ATTN_DISPATCH_STRICT=1: known-wrong: vllm_fa3 0.33.0"):
        ops["paged_attention_out"](batch.q, batch.k_cache, batch.v_cache, out, plan=plan, params=LOCAL)
    assert torch.equal(out, torch.full_like(expected, 7.0)) and calls.fwd == 0


def test_strict_mode_leaves_unlisted_layers_alone():
    provider, calls = make_torch_provider(name="vllm_fa3", version="0.33.0")
    ops = build_ops(provider, strict=True)
    params = AttentionParams(causal=True)
    batch, expected = _paged_case(params)
    plan = ops["make_attention_plan"](**batch.plan_args, layer_params=(params,))
    out = torch.zeros_like(expected)
    ops["paged_attention_out"](batch.q, batch.k_cache, batch.v_cache, out, plan=plan, params=params)
    assert calls.fwd == 1


def test_a_fixed_build_keeps_the_kernel():
    provider, calls = make_torch_provider(name="vllm_fa3", version="0.34.0")
    ops = build_ops(provider)
    batch, expected = _paged_case(LOCAL)
    plan = ops["make_attention_plan"](**batch.plan_args, layer_params=(LOCAL,))
    before = stats.guarded_bindings
    ops["paged_attention_out"](batch.q, batch.k_cache, batch.v_cache, torch.zeros_like(expected), plan=plan, params=LOCAL)
    assert calls.fwd == 1 and stats.guarded_bindings == before


def test_info_note_names_the_guarded_classes():
    guarded, _ = make_torch_provider(name="vllm_fa3", version="0.33.0")
    fixed, _ = make_torch_provider(name="vllm_fa3", version="0.34.0")
    assert "known-wrong: vllm_fa3 0.33.0: local (sliding) window" in describe(guarded, original=False)
    assert "known-wrong" in describe(guarded, original=True)
    assert "known-wrong" not in describe(fixed, original=False)


@pytest.mark.parametrize("paged", [True, False])
@pytest.mark.parametrize(
    "params",
    [AttentionParams(causal=True), AttentionParams(causal=False), LOCAL, TWO_SIDED, AttentionParams(causal=True, softcap=5.0)],
    ids=["causal", "full", "window", "two-sided", "softcap"],
)
def test_dense_route_matches_the_reference(paged, params):
    """An empty sequence, GQA; packed: keys shorter than queries (a query with no visible key gets zeros)."""
    q_lens, k_lens = [3, 0, 6, 1], [2, 4, 13, 7]
    if paged:  # a paged cache holds the new tokens too: at least as many keys as queries
        batch = paged_batch(q_lens=q_lens, k_lens=[4, 4, 13, 7], heads=4, kv_heads=2, head_dim=16, page_size=4)
        plan = reference.make_attention_plan(**batch.plan_args, layer_params=(params,))
        q, k, v = batch.q, batch.k_cache, batch.v_cache
        args = FlashArgs(cu_seqlens_q=plan.cu_seqlens_q, seqused_k=plan.cache_seqlens, page_table=plan.page_table,
                         max_seqlen_q=plan.max_seqlen_q, max_seqlen_k=plan.max_seqlen_k, softmax_scale=16**-0.5,
                         causal=params.causal, window_size=params.window_size, softcap=params.softcap)  # fmt: skip
        expected = torch.zeros(batch.tokens, 4 * 16, dtype=torch.bfloat16)
        reference.paged_attention_out(q, k, v, expected, plan=plan, params=params)
    else:
        q, k, v, lengths = packed_batch(lens=q_lens, k_lens=k_lens, heads=4, kv_heads=2, head_dim=16)
        args = FlashArgs(**lengths, softmax_scale=16**-0.5, causal=params.causal, window_size=params.window_size,
                         softcap=params.softcap)  # fmt: skip
        expected = torch.zeros(q.shape[0], 4 * 16, dtype=torch.bfloat16)
        reference.varlen_attention_out(q, k, v, expected, **lengths, params=params)
    out = torch.full((q.shape[0], 4, 16), 7.0, dtype=torch.bfloat16)
    dense_attention(q, k, v, args, out)
    assert torch.allclose(out.view_as(expected).float(), expected.float(), atol=2e-2, rtol=2e-2)


def test_dense_route_ignores_keys_past_each_sequence():
    """Cache slots past a sequence's length (NaN in a torch.empty cache) do not reach the answer."""
    batch = paged_batch(q_lens=[3, 2], k_lens=[5, 9], heads=4, kv_heads=2, head_dim=16, page_size=4)
    plan = reference.make_attention_plan(**batch.plan_args, layer_params=(LOCAL,))
    args = FlashArgs(cu_seqlens_q=plan.cu_seqlens_q, seqused_k=plan.cache_seqlens, page_table=plan.page_table,
                     max_seqlen_q=plan.max_seqlen_q, max_seqlen_k=plan.max_seqlen_k, softmax_scale=0.25,
                     causal=True, window_size=LOCAL.window_size)  # fmt: skip
    clean = torch.zeros(batch.tokens, 4, 16, dtype=torch.bfloat16)
    dense_attention(batch.q, batch.k_cache, batch.v_cache, args, clean)
    for b, n in enumerate([5, 9]):
        slots = (plan.page_table[b].long()[:, None] * 4 + torch.arange(4)).reshape(-1)[n:]
        for cache in (batch.k_cache, batch.v_cache):
            cache.view(-1, 2, 16)[slots] = float("nan")
    dirty = torch.zeros_like(clean)
    dense_attention(batch.q, batch.k_cache, batch.v_cache, args, dirty)
    assert torch.equal(dirty, clean)


def test_varlen_binding_is_not_reused_across_shapes_the_guard_may_tell_apart(monkeypatch):
    """With the provider listed, a varlen binding is keyed on the layer's shape too: a table entry that
    looked at head dims must not hand one layer's decision to another with the same lengths."""
    entry = kw.KnownWrong("vllm_fa3", "0.33.0", "head dim 32 only", "test", lambda layer: layer.head_dim == 32)
    monkeypatch.setattr(kw, "TABLE", (entry,))
    provider, calls = make_torch_provider(name="vllm_fa3", version="0.33.0")
    ops = build_ops(provider)
    params = AttentionParams(causal=True)
    lengths = packed_batch(lens=[5, 3], heads=4, kv_heads=2, head_dim=16)[3]  # the same tensors every call
    for head_dim, kernel_calls in ((16, 1), (32, 1), (16, 2)):
        q, k, v, _ = packed_batch(lens=[5, 3], heads=4, kv_heads=2, head_dim=head_dim)
        out = torch.zeros(8, 4 * head_dim, dtype=torch.bfloat16)
        ops["varlen_attention_out"](q, k, v, out, **lengths, params=params, softmax_scale=0.25)
        assert calls.fwd == kernel_calls  # head dim 32: the dense route, not the kernel
