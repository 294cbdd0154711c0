"""CPU: the dense torch route's batch mode (``leftpad_k``: a left-padded batch's ``[B, S, heads, d]`` tensors
read in place) against the reference's padded plan; the torch stand-in provider's batch mode and its
scheduler-metadata check; a padded plan's guarded layer through the ops."""

from __future__ import annotations

import pytest
import torch
from attn_dispatch.plans import AttentionParams
from attn_dispatch_flash import FlashArgs
from fa3_torch_provider import make_torch_provider

from attn_dispatch import reference
from attn_dispatch_cuda_fa3 import build_ops
from attn_dispatch_cuda_fa3.dense import bind_dense, dense_attention
from attn_dispatch_cuda_fa3.stats import stats

PARAMS = {
    "causal": AttentionParams(causal=True),
    "full": AttentionParams(causal=False),
    "window": AttentionParams(causal=True, window_size=(4, 0)),
    "two-sided": AttentionParams(causal=False, window_size=(3, 2)),
    "left-only": AttentionParams(causal=False, window_size=(2, -1)),
    "softcap": AttentionParams(causal=True, softcap=5.0),
}
CASES = {
    # (key starts, key ends, S_q, S_k): each row's keys k[b, start:end]
    "decode left-padded": ([0, 5, 11, 3], [12, 12, 12, 12], 1, 12),
    "decode, a row with no keys and one ending early": ([2, 7, 0, 4], [12, 7, 9, 12], 1, 12),
    "prefill left-padded": ([0, 4, 9, 7], [10, 10, 10, 10], 10, 10),
    "extend (fewer queries than keys)": ([1, 6, 0], [14, 14, 11], 3, 14),
    "more queries than keys": ([5, 0], [8, 3], 6, 8),
}


def padded_batch(starts, ends, s_q, s_k, *, heads=4, kv_heads=2, head_dim=16, head_dim_v=None, dtype=torch.float32,
                 transposed=False, seed=0):  # fmt: skip
    """q ``[B, S_q, heads, d]``, k/v ``[B, S_k, kv_heads, d]`` (``transposed``: views of ``[B, heads, S, d]``
    tensors, as transformers hands them), the int32 starts and ends."""
    g = torch.Generator().manual_seed(seed)
    batch, head_dim_v = len(starts), head_dim_v or head_dim

    def rand(s, h, d):
        if transposed:
            return torch.randn(batch, h, s, d, generator=g).to(dtype).transpose(1, 2)
        return torch.randn(batch, s, h, d, generator=g).to(dtype)

    q, k, v = rand(s_q, heads, head_dim), rand(s_k, kv_heads, head_dim), rand(s_k, kv_heads, head_dim_v)
    return q, k, v, torch.tensor(starts, dtype=torch.int32), torch.tensor(ends, dtype=torch.int32)


def batch_args(starts, ends, q, k, params, scale=0.25, **extra) -> FlashArgs:
    return FlashArgs(
        max_seqlen_q=q.shape[1], max_seqlen_k=k.shape[1], softmax_scale=scale, causal=params.causal,
        window_size=params.window_size, softcap=params.softcap, seqused_k=ends, leftpad_k=starts, **extra,
    )  # fmt: skip


def reference_out(q, k, v, starts, ends, params, scale=0.25) -> torch.Tensor:
    """The reference's padded plan, run into a fresh ``[B, S_q, heads, dv]``."""
    plan = reference.make_attention_plan(
        cache_seqlens=ends, key_starts=starts, max_seqlen_q=q.shape[1], max_seqlen_k=k.shape[1],
        num_heads=q.shape[2], num_kv_heads=k.shape[2], head_dim=q.shape[3], head_dim_v=v.shape[3], dtype=q.dtype,
        layer_params=(params,),
    )  # fmt: skip
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype)
    return reference.bind_attention(plan, params=params, softmax_scale=scale)(q, k, v, out)


def poisoned_out(q, v, fill=float("nan")) -> torch.Tensor:
    return torch.full((*q.shape[:-1], v.shape[-1]), fill, dtype=q.dtype)


@pytest.mark.parametrize("params", list(PARAMS.values()), ids=list(PARAMS))
@pytest.mark.parametrize("case", list(CASES))
def test_batch_mode_matches_the_reference_padded_plan(case, params):
    """GQA, fp32: every row of out written (NaN before), the reference's answer to fp32 rounding."""
    starts, ends, s_q, s_k = CASES[case]
    q, k, v, starts, ends = padded_batch(starts, ends, s_q, s_k)
    out = poisoned_out(q, v)
    assert bind_dense(batch_args(starts, ends, q, k, params))(q, k, v, out) is out
    torch.testing.assert_close(out, reference_out(q, k, v, starts, ends, params), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4, 4, 32, 32), (8, 2, 16, 8), (6, 1, 16, 16)], ids=["MHA", "GQA dv 8", "MQA"])
def test_batch_mode_half_precision_heads_and_strides(shape, dtype):
    """transformers' [B, H, S, D] tensors transposed (any strides but the last), out too; head_dim_v apart."""
    heads, kv_heads, head_dim, head_dim_v = shape
    params = AttentionParams(causal=True, window_size=(5, 0), softcap=3.0)
    q, k, v, starts, ends = padded_batch([3, 0, 8], [9, 9, 9], 9, 9, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                                         head_dim_v=head_dim_v, dtype=dtype, transposed=True)  # fmt: skip
    out = torch.full((3, heads, 9, head_dim_v), 7.0, dtype=dtype).transpose(1, 2)
    dense_attention(q, k, v, batch_args(starts, ends, q, k, params), out)
    expected = reference_out(q, k, v, starts, ends, params)
    assert torch.allclose(out.float(), expected.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("params", [PARAMS["causal"], PARAMS["window"], PARAMS["softcap"]], ids=["causal", "window", "softcap"])
def test_left_padded_prefill_gives_pad_queries_zeros(params):
    """Bottom-right alignment over a row's end - start keys: a causal query before the row's first key
    (a pad query of a left-padded prompt) sees nothing and gets zeros; the real queries do not."""
    q, k, v, starts, ends = padded_batch([0, 4, 9, 7], [10] * 4, 10, 10)
    out = poisoned_out(q, v)
    dense_attention(q, k, v, batch_args(starts, ends, q, k, params), out)
    for b, start in enumerate(starts.tolist()):
        assert torch.equal(out[b, :start], torch.zeros_like(out[b, :start])), b
        assert bool((out[b, start:].abs().sum(-1) > 0).all()), b


@pytest.mark.parametrize("case", ["decode left-padded", "decode, a row with no keys and one ending early", "prefill left-padded"])
def test_batch_mode_ignores_nan_outside_each_rows_keys(case):
    """k/v slots outside [start, end) (a torch.empty cache's, NaN say) do not reach the answer: same bytes."""
    starts, ends, s_q, s_k = CASES[case]
    q, k, v, starts, ends = padded_batch(starts, ends, s_q, s_k)
    args = batch_args(starts, ends, q, k, PARAMS["window"])
    clean = poisoned_out(q, v)
    dense_attention(q, k, v, args, clean)
    position = torch.arange(s_k)[None, :]
    unused = (position < starts[:, None]) | (position >= ends[:, None])
    assert bool(unused.any())
    k[unused], v[unused] = float("nan"), float("nan")
    dirty = poisoned_out(q, v, 7.0)
    dense_attention(q, k, v, args, dirty)
    assert not dirty.isnan().any() and torch.equal(dirty, clean)


def test_bind_dense_refuses_mixed_layouts():
    q, k, _, starts, ends = padded_batch([0], [4], 1, 4)
    params = PARAMS["causal"]
    for extra in (dict(page_table=torch.zeros(1, 1, dtype=torch.int32)), dict(cu_seqlens_q=torch.tensor([0, 1], dtype=torch.int32)),
                  dict(cu_seqlens_k=torch.tensor([0, 4], dtype=torch.int32))):  # fmt: skip
        with pytest.raises(NotImplementedError, match="leftpad_k"):
            bind_dense(batch_args(starts, ends, q, k, params, **extra))
    with pytest.raises(NotImplementedError, match="seqused_k"):
        bind_dense(batch_args(starts, ends, q, k, params)._replace(seqused_k=None))


# The torch stand-in provider in batch mode.


def metadata_for(provider, q, k, v, starts, ends, params, *, leftpad=True):
    return provider.scheduler_metadata(
        batch_size=q.shape[0], max_seqlen_q=q.shape[1], max_seqlen_k=k.shape[1], num_heads=q.shape[2],
        num_kv_heads=k.shape[2], head_dim=q.shape[3], head_dim_v=v.shape[3], cache_seqlens=ends, cu_seqlens_q=None,
        page_size=None, dtype=q.dtype, causal=params.causal, window_size=params.window_size, softcap=params.softcap,
        num_splits=params.num_splits, pack_gqa=params.pack_gqa, leftpad_k=starts if leftpad else None,
    )  # fmt: skip


def test_stand_in_batch_mode_computes_the_reference_and_checks_its_metadata():
    provider, calls = make_torch_provider()
    params = PARAMS["softcap"]
    q, k, v, starts, ends = padded_batch([0, 4, 9], [10, 10, 8], 10, 10, dtype=torch.bfloat16, transposed=True)
    expected = reference_out(q, k, v, starts, ends, params)
    meta = metadata_for(provider, q, k, v, starts, ends, params)
    out = torch.full((3, 10, 4, 16), 7.0, dtype=torch.bfloat16)
    provider.bind(batch_args(starts, ends, q, k, params, scheduler_metadata=meta))(q, k, v, out)
    assert torch.equal(out, expected)
    assert (calls.metadata, calls.fwd, calls.fwd_with_metadata, calls.fwd_into_out) == (1, 1, 1, 1)
    # not contiguous: written through a copy, as FA3 writes any out whose last dim is contiguous
    strided = torch.zeros(3, 4, 10, 16, dtype=torch.bfloat16).transpose(1, 2)
    provider.fwd(q, k, v, out=strided, **batch_args(starts, ends, q, k, params)._asdict())
    assert torch.equal(strided, expected) and calls.fwd == 2

    # Metadata made for another schedule is refused: without leftpad, for other starts, for another S_q.
    stale = [
        metadata_for(provider, q, k, v, starts, ends, params, leftpad=False),
        metadata_for(provider, q, k, v, starts + 1, ends, params),
        metadata_for(provider, q[:, :9], k, v, starts, ends, params),
    ]
    for meta in stale:
        with pytest.raises(AssertionError, match="another schedule"):
            provider.fwd(q, k, v, out=out, **batch_args(starts, ends, q, k, params, scheduler_metadata=meta)._asdict())


def test_stand_in_batch_mode_keeps_fa3s_host_checks():
    provider, _ = make_torch_provider()
    params = PARAMS["causal"]
    q, k, v, starts, ends = padded_batch([0, 2], [6, 6], 6, 6, dtype=torch.bfloat16)
    args = batch_args(starts, ends, q, k, params)._asdict()
    with pytest.raises(RuntimeError, match="out must have shape"):
        provider.fwd(q, k, v, out=torch.empty(2, 6, 4, 8, dtype=torch.bfloat16), **args)
    with pytest.raises(RuntimeError, match="out must have shape"):
        provider.fwd(q, k, v, out=torch.empty(12, 4, 16, dtype=torch.bfloat16), **args)
    with pytest.raises(RuntimeError, match="leftpad_k must have dtype int32"):
        provider.fwd(q, k, v, **{**args, "leftpad_k": starts.long()})
    with pytest.raises(RuntimeError, match="batch_size"):
        provider.fwd(q, k[:1], v[:1], **args)


# Through the ops: a padded plan's sliding-window prefill on a build the known-wrong table lists.


def test_guarded_padded_layer_takes_the_dense_route():
    provider, calls = make_torch_provider(name="vllm_fa3", version="0.33.0")
    ops = build_ops(provider)
    params = PARAMS["window"]
    q, k, v, starts, ends = padded_batch([0, 4, 9, 7], [10] * 4, 10, 10, dtype=torch.bfloat16, transposed=True)
    plan = ops["make_attention_plan"](
        cache_seqlens=ends, key_starts=starts, max_seqlen_q=10, max_seqlen_k=10, num_heads=4, num_kv_heads=2,
        head_dim=16, layer_params=(params,),
    )  # fmt: skip
    before = stats.guarded_bindings
    run = ops["bind_attention"](plan, params=params, softmax_scale=0.25)
    out = torch.full((4, 10, 4, 16), 7.0, dtype=torch.bfloat16)
    assert run(q, k, v, out) is out
    assert calls.fwd == 0 and stats.guarded_bindings == before + 1, "the known-wrong kernel was called"
    expected = reference_out(q, k, v, starts, ends, params)
    assert torch.allclose(out.float(), expected.float(), atol=2e-2, rtol=2e-2)


def test_unguarded_padded_layer_reaches_the_stand_in_with_its_metadata():
    provider, calls = make_torch_provider()
    ops = build_ops(provider)
    params = PARAMS["causal"]
    q, k, v, starts, ends = padded_batch([0, 5, 11, 3], [12] * 4, 1, 12, dtype=torch.bfloat16)
    plan = ops["make_attention_plan"](
        cache_seqlens=ends, key_starts=starts, max_seqlen_q=1, max_seqlen_k=12, num_heads=4, num_kv_heads=2,
        head_dim=16, layer_params=(params,),
    )  # fmt: skip
    out = torch.full((4, 1, 4, 16), 7.0, dtype=torch.bfloat16)
    ops["bind_attention"](plan, params=params, softmax_scale=0.25)(q, k, v, out)
    assert (calls.fwd, calls.fwd_with_metadata) == (1, 1)
    assert torch.equal(out, reference_out(q, k, v, starts, ends, params))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_batch_mode_replays_in_a_cuda_graph():
    """No host sync: the dense route's batch mode captures, and a replay reads the ends it finds then."""
    q, k, v, starts, ends = (t.cuda() for t in padded_batch([0, 5, 11, 3], [8] * 4, 1, 12, dtype=torch.bfloat16))
    args = batch_args(starts, ends, q, k, PARAMS["window"])
    out = torch.zeros(4, 1, 4, 16, dtype=torch.bfloat16, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        dense_attention(q, k, v, args, out)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dense_attention(q, k, v, args, out)
    ends += 3
    graph.replay()
    replayed = out.clone()
    dense_attention(q, k, v, args, out)
    assert torch.equal(replayed, out)
