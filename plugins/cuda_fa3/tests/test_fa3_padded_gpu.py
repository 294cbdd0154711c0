"""GPU (sm90 + an FA3 provider): a padded plan's run (FA3's batch mode reading left-padded rows in place)
gives the bytes of the packed plan over the same valid rows, on both paths, eagerly, compiled and in a
CUDA graph."""

from __future__ import annotations

import pytest
import torch
from attn_dispatch import reference
from attn_dispatch.plans import DEFAULT_PARAMS, AttentionParams
from attn_dispatch_cuda_fa3 import build_ops, stats

pytestmark = pytest.mark.cuda

SOFTCAP = AttentionParams(softcap=30.0)
WINDOW = AttentionParams(window_size=(127, 0))


def left_padded(lens, q_len, buffer, heads, kv_heads, head_dim, seed=0):
    """transformers-like [B, H, S, D] tensors viewed [B, S, H, D]; every row's keys end at max(lens)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    batch, end = len(lens), max(lens)

    def rand(h, s):
        return torch.randn(batch, h, s, head_dim, generator=g, device="cuda", dtype=torch.bfloat16).transpose(1, 2)

    q, k, v = rand(heads, q_len), rand(kv_heads, buffer), rand(kv_heads, buffer)
    starts = torch.tensor([end - n for n in lens], dtype=torch.int32, device="cuda")
    ends = torch.full((batch,), end, dtype=torch.int32, device="cuda")
    return q, k, v, starts, ends


def packed_rows(lens, q_len, buffer, end):
    """Row indices of the valid queries and keys in the flattened [B*S] tensors, and their cu_seqlens."""
    q_valid = [min(n, q_len) for n in lens]
    rows_q = torch.cat([torch.arange(q_len - m, q_len, device="cuda") + b * q_len for b, m in enumerate(q_valid)])
    rows_k = torch.cat([torch.arange(end - n, end, device="cuda") + b * buffer for b, n in enumerate(lens)])

    def cu(xs):
        return torch.tensor([0, *torch.tensor(xs).cumsum(0).tolist()], dtype=torch.int32, device="cuda")

    lengths = dict(cu_seqlens_q=cu(q_valid), cu_seqlens_k=cu(lens), max_seqlen_q=max(q_valid), max_seqlen_k=max(lens))
    return rows_q, rows_k, lengths


CASES = {
    # lens (valid keys per row), q_len, buffer (S_k), heads, kv_heads, head_dim
    "prefill left-padded": ([128, 402, 676, 2048], None, None, 32, 8, 128),
    "decode DynamicCache": ([129, 403, 677, 2049], 1, None, 32, 8, 64),
    "decode StaticCache": ([129, 403, 677, 2049], 1, 4096, 32, 8, 128),
    "prefill MHA d256": ([5, 300, 17, 999], None, 1000, 8, 8, 256),
}


@pytest.mark.parametrize("params", [DEFAULT_PARAMS, SOFTCAP, WINDOW], ids=["causal", "softcap", "window"])
@pytest.mark.parametrize("case", list(CASES))
def test_padded_run_equals_packed_run_bytes(provider, case, params):
    lens, q_len, buffer, heads, kv_heads, head_dim = CASES[case]
    end = max(lens)
    q_len, buffer = q_len or end, buffer or end
    q, k, v, starts, ends = left_padded(lens, q_len, buffer, heads, kv_heads, head_dim)
    shape = dict(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, layer_params=(params,))
    outs = []
    for original in (False, True):
        ops = build_ops(provider, original=original)
        builds = stats.metadata_builds
        plan = ops["make_attention_plan"](cache_seqlens=ends, key_starts=starts, max_seqlen_q=q_len, max_seqlen_k=buffer, **shape)
        run = ops["bind_attention"](plan, params=params)
        out = torch.full((len(lens), q_len, heads, head_dim), 7.0, dtype=q.dtype, device="cuda")
        for _ in range(3):  # layers
            run(q, k, v, out)
        assert stats.metadata_builds == builds + (0 if original else 1)
        outs.append(out)
    assert torch.equal(*outs)  # optimized and original paths: the same bytes
    out = outs[0]

    rows_q, rows_k, lengths = packed_rows(lens, q_len, buffer, end)
    ops = build_ops(provider)
    qp = q.reshape(-1, heads, head_dim)[rows_q]
    kp, vp = (x.reshape(-1, kv_heads, head_dim)[rows_k] for x in (k, v))
    packed = torch.empty_like(qp)
    plan = ops["make_attention_plan"](**lengths, **shape)
    ops["bind_attention"](plan, params=params)(qp, kp, vp, packed)
    flat = out.reshape(-1, heads, head_dim)
    # A windowed prefill goes to the dense route on builds the known-wrong table lists, packed and padded
    # alike, whose reductions differ in order: compare those to the fp32 reference instead.
    if params.window_size[0] >= 0 and q_len > 1:
        want = torch.empty(qp.shape, dtype=torch.float32, device="cuda")
        reference.varlen_attention_out(qp.float(), kp.float(), vp.float(), want, **lengths, params=params)
        assert (flat[rows_q].float() - want).abs().max() < 0.02
    else:
        assert torch.equal(flat[rows_q], packed)
    padding = torch.ones(flat.shape[0], dtype=torch.bool, device="cuda")
    padding[rows_q] = False
    assert bool((flat[padding] == 0).all())  # padding queries see no key: zeros


def test_padded_run_compiles_to_the_in_place_custom_op(provider):
    from torch._inductor.utils import run_and_get_code

    lens, heads, kv_heads, head_dim = [33, 700, 5], 16, 4, 128
    q, k, v, starts, ends = left_padded(lens, 1, 1024, heads, kv_heads, head_dim)
    ops = build_ops(provider)
    plan = ops["make_attention_plan"](
        cache_seqlens=ends, key_starts=starts, max_seqlen_q=1, max_seqlen_k=1024, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim,
    )  # fmt: skip
    run = ops["bind_attention"](plan)

    def layer(q, k, v):
        out = q.new_empty(q.shape)
        return run(q, k, v, out)

    torch._dynamo.reset()
    compiled, codes = run_and_get_code(torch.compile(layer, fullgraph=True), q, k, v)
    assert "torch.ops.attn_dispatch_cuda_fa3.attention_out.default(" in "\n".join(codes)
    assert torch.equal(compiled, layer(q, k, v))


def test_padded_run_replays_in_a_cuda_graph(provider):
    lens, heads, kv_heads, head_dim, buffer = [129, 403, 677, 2049], 32, 8, 128, 4096
    q, k, v, starts, ends = left_padded(lens, 1, buffer, heads, kv_heads, head_dim)
    ops = build_ops(provider)
    out = torch.zeros(len(lens), 1, heads, head_dim, dtype=q.dtype, device="cuda")
    plan_args = dict(cache_seqlens=ends, key_starts=starts, max_seqlen_q=1, max_seqlen_k=buffer, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim)

    def step():  # plan inside the capture: the metadata kernel replays with the layer
        ops["bind_attention"](ops["make_attention_plan"](**plan_args))(q, k, v, out)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    ends += 1  # the next decode step: one more key per row, read by the replay
    graph.replay()
    replayed = out.clone()
    step()
    assert torch.equal(replayed, out)
