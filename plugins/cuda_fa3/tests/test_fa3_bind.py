"""CPU: ``bind_attention``'s runs over a torch provider: same bytes as the ops, the binding made once, a
packed plan's metadata made once and read by every layer, and bad input named before anything is written."""

from __future__ import annotations

import pytest
import torch
from attn_dispatch import reference
from attn_dispatch.plans import DEFAULT_PARAMS, AttentionParams
from attn_dispatch_cuda_fa3 import build_ops, stats
from fa3_batches import packed_batch, paged_batch
from fa3_torch_provider import make_torch_provider

SLIDING = AttentionParams(window_size=(8, 0))
SOFTCAP = AttentionParams(softcap=30.0)
MIXED = dict(q_lens=[1, 5, 1, 3], k_lens=[37, 20, 6, 3])
LENS = dict(lens=[5, 1, 12], k_lens=[9, 30, 12])  # prefill rows with a cached prefix, a decode row


def packed_plan(ops, cu, lengths, heads, kv_heads, head_dim, layer_params=(DEFAULT_PARAMS,), dtype=torch.bfloat16):
    return ops["make_attention_plan"](
        cu_seqlens_q=cu["cu_seqlens_q"], cu_seqlens_k=cu["cu_seqlens_k"], max_seqlen_q=lengths["max_seqlen_q"],
        max_seqlen_k=lengths["max_seqlen_k"], num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        dtype=dtype, layer_params=layer_params,
    )  # fmt: skip


@pytest.mark.parametrize("original", [False, True])
@pytest.mark.parametrize("writes_out", [True, False])
@pytest.mark.parametrize("flat_out", [True, False])
@pytest.mark.parametrize("params", [DEFAULT_PARAMS, SOFTCAP, AttentionParams(causal=False)])
def test_paged_run_gives_the_ops_bytes(params, flat_out, writes_out, original):
    batch = paged_batch(**MIXED, heads=8, kv_heads=2, head_dim=64, page_size=16)
    ops = build_ops(make_torch_provider(writes_out=writes_out)[0], original=original)
    plan = ops["make_attention_plan"](**batch.plan_args, layer_params=(params,))
    out, want = batch.out(), batch.out()
    if not flat_out:
        out = out.view(out.shape[0], 8, 64)
    run = ops["bind_attention"](plan, params=params)
    assert run(batch.q, batch.k_cache, batch.v_cache, out) is out
    ops["paged_attention_out"](batch.q, batch.k_cache, batch.v_cache, want, plan=plan, params=params)
    assert torch.equal(out.reshape(want.shape), want)


def test_paged_run_shares_the_layer_binding_with_the_op():
    batch = paged_batch(**MIXED, heads=8, kv_heads=2, head_dim=64, page_size=16)
    ops = build_ops(make_torch_provider()[0])
    plan = ops["make_attention_plan"](**batch.plan_args)
    ops["bind_attention"](plan)
    assert len(plan.layer_calls) == 1
    ops["paged_attention_out"](batch.q, batch.k_cache, batch.v_cache, batch.out(), plan=plan)
    assert len(plan.layer_calls) == 1, "the op must find the run's binding, not bind again"


@pytest.mark.parametrize("original", [False, True])
@pytest.mark.parametrize("params", [DEFAULT_PARAMS, SOFTCAP, AttentionParams(causal=False)])
@pytest.mark.parametrize("shape", [dict(heads=4, kv_heads=4, head_dim=64), dict(heads=8, kv_heads=2, head_dim=32)])
def test_packed_run_matches_varlen_attention_out(shape, params, original):
    provider, calls = make_torch_provider()
    ops = build_ops(provider, original=original)
    q, k, v, lengths = packed_batch(**LENS, **shape)
    plan = packed_plan(ops, lengths, lengths, **shape, layer_params=(params,))
    out = torch.full((q.shape[0] + 2, shape["heads"], shape["head_dim"]), 7.0, dtype=q.dtype)
    want = out.clone()
    ops["bind_attention"](plan, params=params)(q, k, v, out)
    ops["varlen_attention_out"](q, k, v, want, **lengths, params=params)
    assert torch.equal(out, want)
    ref = out.clone()
    reference.varlen_attention_out(q, k, v, ref, **lengths, params=params)
    assert torch.equal(out, ref)
    assert calls.fwd_with_metadata == (0 if original else 1), "the packed plan's run hands FA3 its metadata"


def test_packed_plan_makes_metadata_once_for_every_layer():
    provider, calls = make_torch_provider()
    ops = build_ops(provider)
    q, k, v, lengths = packed_batch(**LENS, heads=8, kv_heads=2, head_dim=32)
    before = stats.metadata_builds
    plan = packed_plan(ops, lengths, lengths, 8, 2, 32, layer_params=(DEFAULT_PARAMS, SOFTCAP))
    assert stats.metadata_builds - before == 2  # one per distinct params, none per layer
    assert torch.equal(plan.cache_seqlens, torch.tensor([9, 30, 12], dtype=torch.int32))
    runs = {p: ops["bind_attention"](plan, params=p) for p in (DEFAULT_PARAMS, SOFTCAP)}
    out = torch.empty(q.shape[0], 8, 32, dtype=q.dtype)
    for layer in range(6):
        runs[(DEFAULT_PARAMS, SOFTCAP)[layer % 2]](q, k, v, out)
    assert calls.metadata == 2 and calls.fwd_with_metadata == 6
    assert stats.metadata_builds - before == 2


def test_packed_plan_makes_no_metadata_for_a_provider_whose_varlen_entry_takes_none():
    """Upstream FA3's flash_attn_varlen_func takes no scheduler_metadata: a packed plan there schedules in
    the kernel (handing it metadata would raise at bind time), while its paged plans still get metadata."""
    provider, calls = make_torch_provider(varlen_takes_metadata=False, paged_seqlen_k_from_page_table=True)
    assert provider.takes_metadata(packed=False) and not provider.takes_metadata(packed=True)
    ops = build_ops(provider)
    q, k, v, lengths = packed_batch(**LENS, heads=4, kv_heads=4, head_dim=32)
    plan = packed_plan(ops, lengths, lengths, 4, 4, 32)
    assert not plan.metadata and calls.metadata == 0
    out, want = torch.empty_like(q), torch.empty_like(q)
    ops["bind_attention"](plan)(q, k, v, out)
    reference.varlen_attention_out(q, k, v, want, **lengths)
    assert torch.equal(out, want) and calls.fwd_with_metadata == 0
    batch = paged_batch(**MIXED, heads=8, kv_heads=2, head_dim=64, page_size=16)
    assert ops["make_attention_plan"](**batch.plan_args).metadata, "paged plans keep their metadata"


def test_packed_plan_is_refused_by_paged_attention_out():
    ops = build_ops(make_torch_provider()[0])
    q, k, v, lengths = packed_batch(**LENS, heads=4, kv_heads=4, head_dim=32)
    plan = packed_plan(ops, lengths, lengths, 4, 4, 32)
    with pytest.raises(ValueError, match="^plan: is a packed plan"):
        ops["paged_attention_out"](q, k.view(-1, 1, 4, 32), v.view(-1, 1, 4, 32), torch.empty_like(q), plan=plan)


def test_packed_plan_is_refused_as_a_static_plan():
    ops = build_ops(make_torch_provider()[0])
    q, k, v, lengths = packed_batch(**LENS, heads=4, kv_heads=4, head_dim=32)
    plan = packed_plan(ops, lengths, lengths, 4, 4, 32)
    with pytest.raises(ValueError, match="^static_plan:"):
        ops["make_attention_plan"](**lengths, num_heads=4, num_kv_heads=4, head_dim=32, static_plan=plan)


def test_run_refuses_another_plugins_plan():
    ops = build_ops(make_torch_provider()[0])
    batch = paged_batch(**MIXED, heads=8, kv_heads=2, head_dim=64, page_size=16)
    with pytest.raises(ValueError, match="^plan:"):
        ops["bind_attention"](reference.make_attention_plan(**batch.plan_args))


def test_run_names_a_mismatched_layer_before_writing():
    ops = build_ops(make_torch_provider()[0])
    batch = paged_batch(**MIXED, heads=8, kv_heads=2, head_dim=64, page_size=16)
    plan = ops["make_attention_plan"](**batch.plan_args)
    run = ops["bind_attention"](plan)
    out = batch.out()
    before = out.clone()
    with pytest.raises(ValueError, match="^q:"):
        run(batch.q[:, :4], batch.k_cache, batch.v_cache, out)
    with pytest.raises(ValueError, match="^out:"):
        run(batch.q, batch.k_cache, batch.v_cache, out.float())
    assert torch.equal(out, before)


def test_known_wrong_packed_layer_takes_the_dense_route():
    """A packed plan's run is bound through the same guard as the ops (a listed provider, a window that
    hides keys, several queries per sequence)."""
    provider, calls = make_torch_provider(name="vllm_fa3", version="0.33.0")
    ops = build_ops(provider)
    q, k, v, lengths = packed_batch(**LENS, heads=4, kv_heads=2, head_dim=32)
    plan = packed_plan(ops, lengths, lengths, 4, 2, 32, layer_params=(SLIDING,))
    before = stats.guarded_bindings
    out = torch.empty_like(q)
    ops["bind_attention"](plan, params=SLIDING)(q, k, v, out)
    assert stats.guarded_bindings == before + 1 and calls.fwd == 0
    want = torch.empty_like(q)
    reference.varlen_attention_out(q, k, v, want, **lengths, params=SLIDING)
    torch.testing.assert_close(out, want, atol=2e-2, rtol=2e-2)


def test_run_rechecks_when_a_shape_changes():
    """The per-call test remembers the last shapes that passed: a different out (flat, 3-D, padded) or a
    different batch is checked and viewed anew, never handed over with the previous call's decision."""
    ops = build_ops(make_torch_provider()[0])
    batch = paged_batch(**MIXED, heads=8, kv_heads=2, head_dim=64, page_size=16)
    plan = ops["make_attention_plan"](**batch.plan_args)
    run = ops["bind_attention"](plan)
    tokens = batch.q.shape[0]
    want = batch.out()
    ops["paged_attention_out"](batch.q, batch.k_cache, batch.v_cache, want, plan=plan)
    outs = [
        batch.out(),  # flat [tokens, heads * d]
        batch.out().view(tokens, 8, 64),  # exactly the kernel's rows
        batch.out(rows=tokens + 3),  # flat with padding rows
        batch.out(rows=tokens + 3).view(tokens + 3, 8, 64),  # 3-D with padding rows
        batch.out(),
    ]
    for out in outs:
        run(batch.q, batch.k_cache, batch.v_cache, out)
        assert torch.equal(out.reshape(out.shape[0], -1)[:tokens], want)
        assert (out.reshape(out.shape[0], -1)[tokens:] == 7.0).all(), "rows past q's are never written"
    with pytest.raises(ValueError, match="^q:"):  # a new layer shape after the first calls passed
        run(batch.q[:, :4], batch.k_cache, batch.v_cache, outs[0])
