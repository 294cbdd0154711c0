"""The padded plan (``make_attention_plan(cache_seqlens=ends, key_starts=starts)``) on the CPU reference.

A padded plan's run reads a padded batch in place: row ``b``'s keys are ``k[b, key_starts[b]:cache_seqlens[b]]``
and all ``S_q`` of its queries attend to them, bottom-right aligned. So each row must equal
``varlen_attention_out`` over that row's keys cut out contiguously: the packed path is the definition the
padded one is checked against, for every mask the params make. The refusals shared with the plugins are in
``attn_dispatch.bad_inputs`` (run by ``test_contracts.py``); only those that need two devices are here.
"""

from __future__ import annotations

import pytest
import torch

from attn_dispatch import DEFAULT_PARAMS, AttentionParams, reference
from attn_dispatch.bad_inputs import CASES

torch.manual_seed(0)

PARAMS = {
    "causal": AttentionParams(),
    "non-causal": AttentionParams(causal=False),
    "window (2, 0)": AttentionParams(window_size=(2, 0)),
    "softcap": AttentionParams(softcap=3.0),
    "non-causal window (2, 1) softcap": AttentionParams(causal=False, window_size=(2, 1), softcap=5.0),
}
# (S_q, S_k, key_starts, key ends). Ends below S_k: a StaticCache's buffer is longer than the keys written.
BATCHES = {
    # decode; row 2 has no key at all (start == end), so its query must get zeros
    "decode, StaticCache-like": (1, 12, [3, 0, 7], [9, 12, 7]),
    # extend: 3 new queries over each row's cached keys, the buffer longer than every row
    "extend, StaticCache-like": (3, 10, [0, 2, 4], [10, 8, 9]),
    # prefill of a left-padded batch: keys start after the padding and run to the end
    "prefill, left-padded": (8, 8, [3, 0, 7], [8, 8, 8]),
}


def padded_batch(starts, ends, s_q, s_k, *, heads=4, kv_heads=2, d=8, dv=None, dtype=torch.float32, layer_params=(DEFAULT_PARAMS,)):
    dv = d if dv is None else dv
    batch = len(starts)
    q = torch.randn(batch, s_q, heads, d).to(dtype)
    k = torch.randn(batch, s_k, kv_heads, d).to(dtype)
    v = torch.randn(batch, s_k, kv_heads, dv).to(dtype)
    plan = reference.make_attention_plan(
        cache_seqlens=torch.tensor(ends, dtype=torch.int32), key_starts=torch.tensor(starts, dtype=torch.int32),
        max_seqlen_q=s_q, max_seqlen_k=s_k, num_heads=heads, num_kv_heads=kv_heads, head_dim=d, head_dim_v=dv,
        dtype=dtype, layer_params=layer_params,
    )  # fmt: skip
    return q, k, v, plan


def per_row_varlen(q, k, v, starts, ends, params=DEFAULT_PARAMS, softmax_scale=None) -> torch.Tensor:
    """What the padded run means: each row through varlen_attention_out over its own keys, cut out."""
    batch, s_q, heads, _ = q.shape
    want = torch.empty(batch, s_q, heads, v.shape[-1], dtype=q.dtype)
    for b, (start, end) in enumerate(zip(starts, ends)):
        reference.varlen_attention_out(
            q[b], k[b, start:end], v[b, start:end], want[b],
            cu_seqlens_q=torch.tensor([0, s_q], dtype=torch.int32), cu_seqlens_k=torch.tensor([0, end - start], dtype=torch.int32),
            max_seqlen_q=s_q, max_seqlen_k=max(end - start, 1), params=params, softmax_scale=softmax_scale,
        )  # fmt: skip
    return want


def run_padded(plan, q, k, v, params=DEFAULT_PARAMS, softmax_scale=None, out=None) -> torch.Tensor:
    # NaN-filled, so a row the run leaves unwritten cannot pass for a computed one
    out = torch.full((*q.shape[:3], plan.head_dim_v), float("nan"), dtype=q.dtype) if out is None else out
    assert reference.bind_attention(plan, params=params, softmax_scale=softmax_scale)(q, k, v, out) is out
    return out


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (6, 1)], ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("params", list(PARAMS))
def test_each_row_equals_varlen_over_its_own_keys(batch, heads, kv_heads, params):
    s_q, s_k, starts, ends = BATCHES[batch]
    params = PARAMS[params]
    q, k, v, plan = padded_batch(starts, ends, s_q, s_k, heads=heads, kv_heads=kv_heads, layer_params=(params,))
    out = run_padded(plan, q, k, v, params)
    torch.testing.assert_close(out, per_row_varlen(q, k, v, starts, ends, params), atol=1e-5, rtol=1e-5)


def test_a_row_with_no_key_gets_zeros_and_every_out_row_is_written():
    s_q, s_k, starts, ends = BATCHES["decode, StaticCache-like"]
    q, k, v, plan = padded_batch(starts, ends, s_q, s_k)
    out = run_padded(plan, q, k, v)
    assert not out.isnan().any()  # the NaN fill is gone from every row
    assert (out[2] == 0).all()  # start == end: no key


@pytest.mark.parametrize("params", [AttentionParams(), AttentionParams(window_size=(2, 0))], ids=["causal", "window (2, 0)"])
def test_left_padded_prefill_pad_queries_get_zeros_and_real_ones_the_unpadded_attention(params):
    """transformers' left-padded prefill: S_q == S_k, row b's first starts[b] positions are padding. A
    causal (or right-bounded window) pad query sees no key, so it gets zeros; a real query sees what it
    would in the unpadded sequence."""
    s, starts = 8, [3, 0, 5]
    q, k, v, plan = padded_batch(starts, [s] * 3, s, s, layer_params=(params,))
    out = run_padded(plan, q, k, v, params)
    for b, start in enumerate(starts):
        assert (out[b, :start] == 0).all()
        want = per_row_varlen(q[b : b + 1, start:], k[b : b + 1], v[b : b + 1], [start], [s], params)
        torch.testing.assert_close(out[b : b + 1, start:], want, atol=1e-5, rtol=1e-5)


def test_key_and_value_slots_outside_the_rows_keys_do_not_leak():
    """Slots before key_starts (padding) and past the key end (a StaticCache's unwritten tail) may hold
    anything, NaN included: a zero probability times NaN is NaN, so they must never be read into the sum."""
    s_q, s_k, starts, ends = BATCHES["extend, StaticCache-like"]
    q, k, v, plan = padded_batch(starts, ends, s_q, s_k)
    clean = run_padded(plan, q, k, v)
    for b, (start, end) in enumerate(zip(starts, ends)):
        for t in (k, v):
            t[b, :start] = float("nan")
            t[b, end:] = float("nan")
    dirty = run_padded(plan, q, k, v)
    assert not dirty.isnan().any()
    assert torch.equal(dirty, clean)


def test_transformers_layout_is_read_and_written_in_place():
    """q/k/v as transformers holds them ([B, H, S, D] tensors, transposed to [B, S, H, D]: only the last dim
    contiguous) and out written through the same kind of view, with head_dim_v != head_dim: the same bytes
    as contiguous tensors give."""
    s_q, s_k, starts, ends = BATCHES["extend, StaticCache-like"]
    q, k, v, plan = padded_batch(starts, ends, s_q, s_k, d=8, dv=16)
    q_t, k_t, v_t = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not q_t.is_contiguous() and q_t.stride(-1) == 1
    heads_first = torch.full((len(starts), 4, s_q, 16), float("nan"))  # the [B, H, S_q, Dv] buffer transformers reads
    run_padded(plan, q_t, k_t, v_t, out=heads_first.transpose(1, 2))
    assert torch.equal(heads_first.transpose(1, 2), run_padded(plan, q, k, v))


def test_softmax_scale_and_bf16_follow_varlen():
    s_q, s_k, starts, ends = BATCHES["extend, StaticCache-like"]
    q, k, v, plan = padded_batch(starts, ends, s_q, s_k, dtype=torch.bfloat16)
    out = run_padded(plan, q, k, v, softmax_scale=0.3)
    want = per_row_varlen(q, k, v, starts, ends, softmax_scale=0.3)
    torch.testing.assert_close(out.float(), want.float(), atol=1e-2, rtol=1e-2)


def test_plan_holds_the_engines_tensors_as_given():
    """Made and used with no sync and no copy: the plan keeps the caller's ends and starts."""
    ends, starts = torch.tensor([6, 5], dtype=torch.int32), torch.tensor([2, 0], dtype=torch.int32)
    plan = reference.make_attention_plan(
        cache_seqlens=ends, key_starts=starts, max_seqlen_q=3, max_seqlen_k=6, num_heads=4, num_kv_heads=2, head_dim=8
    )
    assert plan.kind == "padded" and plan.batch_size == 2 and not plan.paged
    assert plan.cache_seqlens is ends and plan.key_starts is starts
    assert plan.cu_seqlens_q is None and plan.cu_seqlens_k is None and plan.page_table is None and plan.page_size is None


def test_paged_attention_out_refuses_a_padded_plan_naming_plan():
    q, k, v, plan = padded_batch([2, 0], [6, 5], 3, 6)
    out = torch.full((6, 4, 8), 9.0)
    with pytest.raises(ValueError, match=r"^plan: is a padded plan"):
        reference.paged_attention_out(q[:, 0], k, v, out, plan=plan)
    assert (out == 9.0).all()


# The device rules need a second device; "meta" stands in for it (the shared table builds every tensor
# on the one device under test, so these cannot be there).
def test_key_starts_on_another_device_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"^key_starts: expected device cpu, got meta"):
        reference.make_attention_plan(
            cache_seqlens=torch.tensor([6, 5], dtype=torch.int32), key_starts=torch.tensor([2, 0], dtype=torch.int32, device="meta"),
            max_seqlen_q=3, max_seqlen_k=6, num_heads=4, num_kv_heads=2, head_dim=8,
        )  # fmt: skip


@pytest.mark.parametrize("name", ["q", "k", "v", "out"])
def test_run_tensor_on_another_device_is_refused_naming_it(name):
    q, k, v, plan = padded_batch([2, 0], [6, 5], 3, 6)
    tensors = dict(q=q, k=k, v=v, out=torch.full((2, 3, 4, 8), 9.0))
    tensors[name] = tensors[name].to("meta")
    with pytest.raises(ValueError, match=rf"^{name}: expected device cpu, got meta"):
        reference.bind_attention(plan)(*tensors.values())
    if name != "out":
        assert (tensors["out"] == 9.0).all()


def test_the_shared_bad_input_table_covers_the_padded_plan():
    """Every implementation is held to the padded refusals through attn_dispatch.bad_inputs: each argument
    a padded plan or its run can get wrong has a case there (this keeps them from being dropped)."""
    padded = [c for c in CASES if "padded" in c.id]
    plan_args = {c.arg for c in padded if c.op == "make_attention_plan"}
    run_args = {c.arg for c in padded if c.op == "bind_attention"}
    assert {"key_starts", "page_table", "page_size", "cu_seqlens_q", "static_plan", "cache_seqlens"} <= plan_args
    assert {"q", "k", "v", "out", "params"} <= run_args
    assert any(c.op == "paged_attention_out" and c.arg == "plan" for c in padded)
