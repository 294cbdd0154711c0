"""CPU: the cuda_fa3 ops over a torch provider (plan keys, out handling, copy counting, errors)."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from attn_dispatch import reference
from attn_dispatch.plans import DEFAULT_PARAMS, AttentionParams
from attn_dispatch_cuda_fa3 import FlashPlan, build_ops, stats
from fa3_batches import packed_batch, paged_batch
from fa3_torch_provider import make_torch_provider

SLIDING = AttentionParams(window_size=(8, 0))
SOFTCAP = AttentionParams(softcap=30.0)
MIXED = dict(q_lens=[1, 5, 1, 3], k_lens=[37, 20, 6, 3])  # decode, extend, decode, fresh prefill


def run_paged(ops, batch, out, params=DEFAULT_PARAMS, layer_params=(DEFAULT_PARAMS,)):
    plan = ops["make_attention_plan"](**batch.plan_args, layer_params=layer_params)
    return ops["paged_attention_out"](batch.q, batch.k_cache, batch.v_cache, out, plan=plan, params=params)


def reference_paged(batch, out, params=DEFAULT_PARAMS):
    plan = reference.make_attention_plan(**batch.plan_args, layer_params=(params,))
    return reference.paged_attention_out(batch.q, batch.k_cache, batch.v_cache, out, plan=plan, params=params)


@pytest.mark.parametrize("op", ["make_attention_plan", "paged_attention_out", "varlen_attention_out"])
def test_signatures_match_the_reference(op):
    ops = build_ops(make_torch_provider()[0])
    assert inspect.signature(ops[op]) == inspect.signature(getattr(reference, op))


@pytest.mark.parametrize("writes_out", [True, False])
@pytest.mark.parametrize("original", [False, True])
@pytest.mark.parametrize(
    "shape",
    [
        dict(heads=4, kv_heads=4, head_dim=64, page_size=16),  # MHA
        dict(heads=8, kv_heads=2, head_dim=64, page_size=1),  # GQA 4, page size 1
        dict(heads=6, kv_heads=1, head_dim=32, head_dim_v=16, page_size=8),  # MQA, distinct v head dim
    ],
)
@pytest.mark.parametrize("params", [DEFAULT_PARAMS, SLIDING, SOFTCAP, AttentionParams(causal=False)])
def test_paged_matches_the_reference(shape, params, writes_out, original):
    batch = paged_batch(**MIXED, **shape, padding_rows=2)
    ops = build_ops(make_torch_provider(writes_out=writes_out)[0], original=original)
    out, want = batch.out(rows=batch.q.shape[0] + 3), batch.out(rows=batch.q.shape[0] + 3)
    assert run_paged(ops, batch, out, params, layer_params=(params,)) is out
    reference_paged(batch, want, params)
    real = batch.tokens
    assert torch.equal(out[:real], want[:real])
    assert (out[batch.q.shape[0] :] == 7.0).all(), "rows past q's rows must never be written"


@pytest.mark.parametrize("flat", [True, False])
def test_out_may_be_flat_or_3d(flat):
    batch = paged_batch(**MIXED, heads=4, kv_heads=2, head_dim=32)
    ops = build_ops(make_torch_provider()[0])
    out, want = batch.out(flat=flat), batch.out(flat=flat)
    run_paged(ops, batch, out)
    reference_paged(batch, want)
    assert torch.equal(out, want)


def test_one_metadata_per_distinct_params_and_none_per_layer():
    provider, calls = make_torch_provider()
    ops = build_ops(provider)
    batch = paged_batch(**MIXED, heads=4, kv_heads=2, head_dim=32)
    layers = [DEFAULT_PARAMS, SLIDING, DEFAULT_PARAMS, SLIDING, SOFTCAP, DEFAULT_PARAMS]  # Gemma-style mix
    plan = ops["make_attention_plan"](**batch.plan_args, layer_params=layers)
    assert isinstance(plan, FlashPlan)
    assert plan.layer_params == (DEFAULT_PARAMS, SLIDING, SOFTCAP)
    assert set(plan.metadata) == {DEFAULT_PARAMS, SLIDING, SOFTCAP}
    assert calls.metadata == 3 and stats.metadata_builds == 3
    for params in layers:
        out, want = batch.out(), batch.out()
        ops["paged_attention_out"](batch.q, batch.k_cache, batch.v_cache, out, plan=plan, params=params)
        reference_paged(batch, want, params)
        assert torch.equal(out, want)
    # every layer used its own key's metadata (the provider rejects a mismatch) and built none
    assert calls.metadata == 3
    assert calls.fwd_with_metadata == len(layers) == calls.fwd_into_out
    assert stats.out_copies == 0


def test_metadata_is_keyed_by_every_scheduling_input():
    provider, _ = make_torch_provider()
    ops = build_ops(provider)
    batch = paged_batch(**MIXED, heads=4, kv_heads=2, head_dim=32)
    keys = [DEFAULT_PARAMS, SLIDING, SOFTCAP, AttentionParams(num_splits=1), AttentionParams(pack_gqa=False), AttentionParams(causal=False)]
    plan = ops["make_attention_plan"](**batch.plan_args, layer_params=keys)
    contents = {tuple(plan.metadata[p].tolist()) for p in keys}
    assert len(contents) == len(keys)
    # a layer handed another key's metadata would be mis-scheduled: the strict provider proves which it got
    wrong = dataclasses.replace(plan, metadata={DEFAULT_PARAMS: plan.metadata[SLIDING]})
    with pytest.raises(AssertionError, match="another schedule"):
        ops["paged_attention_out"](batch.q, batch.k_cache, batch.v_cache, batch.out(), plan=wrong)


@pytest.mark.parametrize("from_page_table", [False, True], ids=["vllm-style", "sgl-style"])
def test_metadata_is_made_for_the_key_length_the_forward_schedules(from_page_table):
    """vllm's raw op schedules a paged forward for the max_seqlen_k it is given; the sgl_kernel and upstream
    wrappers pass none, so FA3 uses the page table's capacity. A page table wider than max_seqlen_k tells
    the two apart; the strict provider refuses metadata made for the other length."""
    provider, calls = make_torch_provider(paged_seqlen_k_from_page_table=from_page_table)
    batch = paged_batch(**MIXED, heads=4, kv_heads=2, head_dim=32, spare_columns=3)
    out, want = batch.out(), batch.out()
    run_paged(build_ops(provider), batch, out)
    reference_paged(batch, want)
    assert torch.equal(out, want) and calls.fwd_with_metadata == 1

    plans = [
        build_ops(make_torch_provider(paged_seqlen_k_from_page_table=flag)[0])["make_attention_plan"](**batch.plan_args)
        for flag in (False, True)
    ]
    assert not torch.equal(plans[0].metadata[DEFAULT_PARAMS], plans[1].metadata[DEFAULT_PARAMS])


def test_unplanned_params_are_refused_before_any_launch():
    provider, calls = make_torch_provider()
    ops = build_ops(provider)
    batch = paged_batch(**MIXED, heads=4, kv_heads=2, head_dim=32)
    plan = ops["make_attention_plan"](**batch.plan_args)  # DEFAULT_PARAMS only
    out = batch.out()
    with pytest.raises(ValueError, match=r"^params: .*window_size=\(8, 0\).*layer_params"):
        ops["paged_attention_out"](batch.q, batch.k_cache, batch.v_cache, out, plan=plan, params=SLIDING)
    assert calls.fwd == 0 and (out == 7.0).all()


def test_original_path_makes_no_metadata_and_matches_bytes():
    provider, calls = make_torch_provider()
    optimized, original = build_ops(provider), build_ops(provider, original=True)
    batch = paged_batch(**MIXED, heads=8, kv_heads=2, head_dim=32)
    plan = original["make_attention_plan"](**batch.plan_args, layer_params=(DEFAULT_PARAMS, SLIDING))
    assert plan.metadata == {} and calls.metadata == 0
    for params in (DEFAULT_PARAMS, SLIDING):
        a, b = batch.out(), batch.out()
        original["paged_attention_out"](batch.q, batch.k_cache, batch.v_cache, a, plan=plan, params=params)
        run_paged(optimized, batch, b, params, layer_params=(params,))
        assert torch.equal(a, b)
    assert calls.fwd_into_out == 2  # only the optimized calls handed the kernel `out`
    assert stats.out_copies == 0  # the original path's copy is by design, not counted


def test_provider_without_out_copies_once_and_counts_it():
    provider, calls = make_torch_provider(writes_out=False)
    ops = build_ops(provider)
    batch = paged_batch(**MIXED, heads=4, kv_heads=2, head_dim=32)
    plan = ops["make_attention_plan"](**batch.plan_args)
    for layer in range(3):
        out, want = batch.out(), batch.out()
        ops["paged_attention_out"](batch.q, batch.k_cache, batch.v_cache, out, plan=plan)
        reference_paged(batch, want)
        assert torch.equal(out, want)
        assert stats.out_copies == layer + 1
    q, k, v, lens = packed_batch(lens=[5, 9], heads=4, kv_heads=2, head_dim=32)
    ops["varlen_attention_out"](q, k, v, torch.empty(14, 4, 32, dtype=q.dtype), **lens)
    assert stats.out_copies == 4 and calls.fwd_into_out == 0


def test_provider_without_metadata_schedules_in_the_kernel():
    provider, calls = make_torch_provider(metadata=False)  # FA4-like
    ops = build_ops(provider)
    batch = paged_batch(**MIXED, heads=4, kv_heads=2, head_dim=32)
    out, want = batch.out(), batch.out()
    plan = ops["make_attention_plan"](**batch.plan_args, layer_params=(DEFAULT_PARAMS, SLIDING))
    assert plan.metadata == {} and plan.layer_params == (DEFAULT_PARAMS, SLIDING)
    ops["paged_attention_out"](batch.q, batch.k_cache, batch.v_cache, out, plan=plan, params=SLIDING)
    reference_paged(batch, want, SLIDING)
    assert torch.equal(out, want) and calls.fwd_into_out == 1
    with pytest.raises(ValueError, match="^params:"):
        ops["paged_attention_out"](batch.q, batch.k_cache, batch.v_cache, out, plan=plan, params=SOFTCAP)


@pytest.mark.parametrize("writes_out", [True, False])
@pytest.mark.parametrize("params", [DEFAULT_PARAMS, SLIDING, AttentionParams(causal=False)])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
def test_varlen_matches_the_reference(params, heads, kv_heads, writes_out):
    ops = build_ops(make_torch_provider(writes_out=writes_out)[0])
    q, k, v, lens = packed_batch(lens=[5, 1, 9], heads=heads, kv_heads=kv_heads, head_dim=32)
    out = torch.full((17, heads * 32), 7.0, dtype=q.dtype)
    want = out.clone()
    assert ops["varlen_attention_out"](q, k, v, out, **lens, params=params) is out
    reference.varlen_attention_out(q, k, v, want, **lens, params=params)
    assert torch.equal(out, want)
    assert (out[15:] == 7.0).all()


# ---- bad input: ValueError naming the argument, before anything is written, `out` untouched ----------
# Per call the plugin checks in Python only what FA3 cannot (plan match, same device, contiguous `out`);
# the rest is FA3's own host checks, which refuse before launching. Either way the detailed checks name the
# argument. The stand-in provider makes FA3's checks (fa3_torch_provider._fa3_host_checks).


def _paged_case(mutate):
    """Return (call, out) where call() runs the paged op on a batch changed by mutate(dict of args)."""
    provider, calls = make_torch_provider()
    ops = build_ops(provider)
    batch = paged_batch(**MIXED, heads=4, kv_heads=2, head_dim=32)
    plan = ops["make_attention_plan"](**batch.plan_args)
    args = dict(q=batch.q, k_cache=batch.k_cache, v_cache=batch.v_cache, out=batch.out(), plan=plan, params=DEFAULT_PARAMS)
    mutate(args)
    return (lambda: ops["paged_attention_out"](args.pop("q"), args.pop("k_cache"), args.pop("v_cache"), args.pop("out"), **args)), args, calls


PAGED_ERRORS = {
    "q dtype": (lambda a: a.update(q=a["q"].float()), "q"),
    "q device": (lambda a: a.update(q=a["q"].to("meta")), "q"),
    "q heads": (lambda a: a.update(q=a["q"][:, :2]), "q"),
    "q strided last dim": (lambda a: a.update(q=a["q"].repeat_interleave(2, dim=2)[..., ::2]), "q"),
    "k_cache dtype": (lambda a: a.update(k_cache=a["k_cache"].half()), "k_cache"),
    "k_cache page size": (lambda a: a.update(k_cache=a["k_cache"][:, :8]), "k_cache"),
    "v_cache kv heads": (lambda a: a.update(v_cache=a["v_cache"][:, :, :1]), "v_cache"),
    "out dtype": (lambda a: a.update(out=a["out"].float()), "out"),
    "out too short": (lambda a: a.update(out=a["out"][:3]), "out"),
    "out width": (lambda a: a.update(out=a["out"][:, :64]), "out"),
    "out not contiguous": (lambda a: a.update(out=torch.full((a["out"].shape[1], a["out"].shape[0]), 7.0, dtype=a["out"].dtype).t()), "out"),
    "plan from the reference": (lambda a: a.update(plan=reference.make_attention_plan(**paged_batch(**MIXED, heads=4, kv_heads=2, head_dim=32).plan_args)), "plan"),
    "params not planned": (lambda a: a.update(params=SOFTCAP), "params"),
}


@pytest.mark.parametrize("case", list(PAGED_ERRORS))
def test_paged_bad_input(case):
    mutate, arg = PAGED_ERRORS[case]
    call, args, calls = _paged_case(mutate)
    out = args["out"]
    before = out.clone() if out.device.type != "meta" else None
    with pytest.raises(ValueError, match=f"^{arg}: "):
        call()
    assert torch.equal(out, before)


PLAN_ERRORS = {
    "page_table batch": (lambda a: a.update(page_table=a["page_table"][:2]), "page_table"),
    "cache_seqlens dtype": (lambda a: a.update(cache_seqlens=a["cache_seqlens"].long()), "cache_seqlens"),
    "cu_seqlens_q length": (lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"][:-1]), "cu_seqlens_q"),
    "heads not divisible": (lambda a: a.update(num_heads=6, num_kv_heads=4), "num_heads"),
    "float32": (lambda a: a.update(dtype=torch.float32), "dtype"),
    "max_seqlen_k past the page table": (lambda a: a.update(max_seqlen_k=10_000), "max_seqlen_k"),
    "no layer params": (lambda a: a.update(layer_params=()), "layer_params"),
    "page_table strided": (lambda a: a.update(page_table=a["page_table"].repeat_interleave(2, dim=1)[:, ::2]), "page_table"),
}


@pytest.mark.parametrize("case", list(PLAN_ERRORS))
def test_plan_bad_input(case):
    mutate, arg = PLAN_ERRORS[case]
    provider, calls = make_torch_provider()
    args = dict(paged_batch(**MIXED, heads=4, kv_heads=2, head_dim=32).plan_args)
    mutate(args)
    with pytest.raises(ValueError, match=f"^{arg}: "):
        build_ops(provider)["make_attention_plan"](**args)
    assert calls.metadata == 0


VARLEN_ERRORS = {
    "q dtype": (lambda a: a.update(q=a["q"].float()), "q"),
    "k device": (lambda a: a.update(k=a["k"].to("meta")), "k"),
    "heads not divisible": (lambda a: a.update(k=torch.cat([a["k"]] * 2, 1), v=torch.cat([a["v"]] * 2, 1)), "q"),
    "v tokens": (lambda a: a.update(v=a["v"][:-1]), "v"),
    "cu_seqlens_k length": (lambda a: a.update(cu_seqlens_k=a["cu_seqlens_k"][:-1]), "cu_seqlens_k"),
    "cu_seqlens_q int64": (lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"].long()), "cu_seqlens_q"),
    "out shape": (lambda a: a.update(out=a["out"][:, :2]), "out"),
    "out not contiguous": (lambda a: a.update(out=a["out"].transpose(0, 1).contiguous().transpose(0, 1)), "out"),
}


@pytest.mark.parametrize("case", list(VARLEN_ERRORS))
def test_varlen_bad_input(case):
    mutate, arg = VARLEN_ERRORS[case]
    provider, calls = make_torch_provider()
    q, k, v, lens = packed_batch(lens=[5, 9], heads=6, kv_heads=2, head_dim=32)
    args = dict(q=q, k=k, v=v, out=torch.full((14, 6, 32), 7.0, dtype=q.dtype), **lens)
    mutate(args)
    out = args["out"]
    before = out.clone()
    with pytest.raises(ValueError, match=f"^{arg}: "):
        build_ops(provider)["varlen_attention_out"](args.pop("q"), args.pop("k"), args.pop("v"), args.pop("out"), **args)
    assert torch.equal(out, before)


def test_a_kernel_refusal_is_named_and_chained():
    call, args, calls = _paged_case(lambda a: a.update(k_cache=a["k_cache"].half()))
    with pytest.raises(ValueError, match="^k_cache: ") as raised:
        call()
    assert calls.fwd == 1 and isinstance(raised.value.__cause__, RuntimeError)  # FA3's check came first


def test_a_kernel_error_the_checks_cannot_explain_propagates_unchanged(monkeypatch):
    provider, _ = make_torch_provider()
    boom = RuntimeError("CUDA error: out of memory")

    def fwd(*args, **kwargs):
        raise boom

    ops = build_ops(dataclasses.replace(provider, fwd=fwd))
    batch = paged_batch(**MIXED, heads=4, kv_heads=2, head_dim=32)
    plan = ops["make_attention_plan"](**batch.plan_args)
    with pytest.raises(RuntimeError) as raised:
        ops["paged_attention_out"](batch.q, batch.k_cache, batch.v_cache, batch.out(), plan=plan)
    assert raised.value is boom


def test_well_formed_calls_skip_the_detailed_checks(monkeypatch):
    """The per-layer path is the fast check plus the kernel call (the detailed checks explain failures only)."""
    from attn_dispatch_cuda_fa3 import ops as ops_module

    def detailed(*args):
        raise AssertionError("detailed checks ran on a well-formed call")

    monkeypatch.setattr(ops_module, "check_paged", detailed)
    monkeypatch.setattr(ops_module, "check_varlen", detailed)
    provider, _ = make_torch_provider()
    ops = build_ops(provider)
    batch = paged_batch(**MIXED, heads=4, kv_heads=2, head_dim=32)
    plan = ops["make_attention_plan"](**batch.plan_args)
    ops["paged_attention_out"](batch.q, batch.k_cache, batch.v_cache, batch.out(), plan=plan)
    q, k, v, lens = packed_batch(lens=[5, 9], heads=6, kv_heads=2, head_dim=32)
    ops["varlen_attention_out"](q, k, v, torch.empty(14, 6 * 32, dtype=q.dtype), **lens)


@pytest.mark.parametrize("original", [False, True])
def test_out_dtype_is_checked_when_the_kernel_never_sees_out(original):
    """Upstream FA3 (writes_out=False) and the original path copy into `out`; copy_ would convert dtypes."""
    provider, _ = make_torch_provider(writes_out=False)
    ops = build_ops(provider, original=original)
    batch = paged_batch(**MIXED, heads=4, kv_heads=2, head_dim=32)
    plan = ops["make_attention_plan"](**batch.plan_args)
    out = batch.out().float()
    with pytest.raises(ValueError, match="^out: "):
        ops["paged_attention_out"](batch.q, batch.k_cache, batch.v_cache, out, plan=plan)
    q, k, v, lens = packed_batch(lens=[5, 9], heads=6, kv_heads=2, head_dim=32)
    with pytest.raises(ValueError, match="^out: "):
        ops["varlen_attention_out"](q, k, v, torch.zeros(14, 6 * 32), **lens)


def test_a_plan_binds_each_layer_call_once():
    """The first layer with given params binds the kernel call into the plan; later layers look it up."""
    provider, calls = make_torch_provider()
    binds = []

    def bind_args(args):
        binds.append(args)
        return lambda q, k, v, out: provider.fwd(q, k, v, out=out, **args._asdict())

    ops = build_ops(dataclasses.replace(provider, bind_args=bind_args))
    batch = paged_batch(**MIXED, heads=4, kv_heads=2, head_dim=32)
    plan = ops["make_attention_plan"](**batch.plan_args, layer_params=(DEFAULT_PARAMS, SLIDING))
    layers = [(DEFAULT_PARAMS, None), (SLIDING, None), (DEFAULT_PARAMS, None), (SLIDING, None), (DEFAULT_PARAMS, 0.5)]
    for params, scale in layers:
        out, want = batch.out(), batch.out()
        ops["paged_attention_out"](batch.q, batch.k_cache, batch.v_cache, out, plan=plan, params=params, softmax_scale=scale)
        plan_ref = reference.make_attention_plan(**batch.plan_args, layer_params=(params,))
        reference.paged_attention_out(batch.q, batch.k_cache, batch.v_cache, want, plan=plan_ref, params=params, softmax_scale=scale)
        assert torch.equal(out, want)
    assert len(binds) == 3 and calls.fwd_with_metadata == len(layers)
    assert binds[0].scheduler_metadata is plan.metadata[DEFAULT_PARAMS]
    assert binds[1].window_size == (8, 0) and binds[2].softmax_scale == 0.5
    # the next step's plan binds afresh (its tensors and metadata are new)
    next_plan = ops["make_attention_plan"](**batch.plan_args, layer_params=(DEFAULT_PARAMS, SLIDING))
    ops["paged_attention_out"](batch.q, batch.k_cache, batch.v_cache, batch.out(), plan=next_plan)
    assert len(binds) == 4 and binds[3].scheduler_metadata is next_plan.metadata[DEFAULT_PARAMS]


def test_a_used_plan_is_still_refused_by_other_ops():
    """Bound calls are kept per ops: another provider's ops (or the original path) never pick them up."""
    provider, _ = make_torch_provider()
    other = build_ops(make_torch_provider(name="other_fa3")[0])
    ops, original = build_ops(provider), build_ops(provider, original=True)
    batch = paged_batch(**MIXED, heads=4, kv_heads=2, head_dim=32)
    plan = ops["make_attention_plan"](**batch.plan_args)
    ops["paged_attention_out"](batch.q, batch.k_cache, batch.v_cache, batch.out(), plan=plan)
    with pytest.raises(ValueError, match="^plan: .*torch_fa3"):
        other["paged_attention_out"](batch.q, batch.k_cache, batch.v_cache, batch.out(), plan=plan)
    before = stats.out_copies
    a, b = batch.out(), batch.out()
    original["paged_attention_out"](batch.q, batch.k_cache, batch.v_cache, a, plan=plan)
    ops["paged_attention_out"](batch.q, batch.k_cache, batch.v_cache, b, plan=plan)
    assert torch.equal(a, b) and stats.out_copies == before
    assert len(plan.layer_calls) == 2  # one per ops


def test_varlen_binds_once_while_the_lengths_stay_the_same():
    """Every layer of a prefill step passes the same lengths: one binding serves them all; new lengths
    (or params, or scale) bind afresh, and a refilled cu_seqlens tensor is read at every call."""
    provider, calls = make_torch_provider()
    binds = []

    def bind_args(args):
        binds.append(args)
        return lambda q, k, v, out: provider.fwd(q, k, v, out=out, **args._asdict())

    ops = build_ops(dataclasses.replace(provider, bind_args=bind_args))
    q, k, v, lens = packed_batch(lens=[5, 9], heads=4, kv_heads=2, head_dim=32)

    def layer(params=DEFAULT_PARAMS, scale=None, lengths=lens):
        out, want = torch.zeros(14, 128, dtype=q.dtype), torch.zeros(14, 128, dtype=q.dtype)
        ops["varlen_attention_out"](q, k, v, out, **lengths, params=params, softmax_scale=scale)
        reference.varlen_attention_out(q, k, v, want, **lengths, params=params, softmax_scale=scale)
        assert torch.equal(out, want)

    for _ in range(4):
        layer()
    assert len(binds) == 1 and binds[0].softmax_scale == 32**-0.5 and binds[0].cu_seqlens_q is lens["cu_seqlens_q"]
    layer(params=SLIDING)
    layer(scale=0.25)
    assert len(binds) == 3
    lens["cu_seqlens_q"].copy_(torch.tensor([0, 9, 14], dtype=torch.int32))  # refilled in place (q and k share it)
    layer(scale=0.25)
    assert len(binds) == 3
    layer(lengths={**lens, "cu_seqlens_q": lens["cu_seqlens_q"].clone()})  # another tensor: bound afresh
    assert len(binds) == 4 and calls.fwd == 8


def test_varlen_repeat_call_still_checks_out_and_v():
    """The repeat-call fast path (same lengths and shapes as the last call that passed) still refuses an
    ``out`` of another dtype or not contiguous, and a bad ``v``, naming them before anything is written."""
    ops = build_ops(make_torch_provider()[0])
    q, k, v, lens = packed_batch(lens=[5, 9], heads=4, kv_heads=2, head_dim=32)
    good = torch.zeros(14, 128, dtype=q.dtype)
    ops["varlen_attention_out"](q, k, v, good, **lens)  # the call the next ones repeat
    other_dtype = torch.full((14, 128), 7.0, dtype=torch.float32)
    strided = torch.full((128, 14), 7.0, dtype=q.dtype).t()  # [14, 128], not contiguous
    for out in (other_dtype, strided):
        with pytest.raises(ValueError, match="^out: "):
            ops["varlen_attention_out"](q, k, v, out, **lens)
        assert (out == 7.0).all()
    out = torch.full((14, 128), 7.0, dtype=q.dtype)
    with pytest.raises(ValueError, match="^v: "):
        ops["varlen_attention_out"](q, k, v.float(), out, **lens)
    assert (out == 7.0).all()
    ops["varlen_attention_out"](q, k, v, out, **lens)  # and the good call runs again
    assert torch.equal(out, good)


def test_wrong_rank_q_is_named():
    """A 2-D or 4-D q never reaches the kernel as an IndexError or an unpacking error: ValueError naming q."""
    provider, calls = make_torch_provider()
    ops = build_ops(provider)
    q, k, v, lens = packed_batch(lens=[5, 9], heads=4, kv_heads=2, head_dim=32)
    out = torch.full((14, 4, 32), 7.0, dtype=q.dtype)
    for bad in (q.flatten(1), q[None]):
        with pytest.raises(ValueError, match="^q: "):
            ops["varlen_attention_out"](bad, k, v, out, **lens)
    batch = paged_batch(**MIXED, heads=4, kv_heads=2, head_dim=32)
    plan = ops["make_attention_plan"](**batch.plan_args)
    for bad in (batch.q.flatten(1), batch.q[None]):
        with pytest.raises(ValueError, match="^q: "):
            ops["paged_attention_out"](bad, batch.k_cache, batch.v_cache, batch.out(), plan=plan)
    assert (out == 7.0).all()


@pytest.mark.parametrize(
    "changes,arg",
    [
        (dict(plan=None), "plan"),
        (dict(plan=(1, 2)), "plan"),
        (dict(params="causal"), "params"),
        (dict(params=[True]), "params"),  # unhashable: never reaches the plan's dict as a TypeError
        (dict(softmax_scale="0.1"), "softmax_scale"),
    ],
)
def test_paged_wrong_types_are_named(changes, arg):
    ops = build_ops(make_torch_provider()[0])
    batch = paged_batch(**MIXED, heads=4, kv_heads=2, head_dim=32)
    kwargs = {"plan": ops["make_attention_plan"](**batch.plan_args), **changes}
    out = batch.out()
    with pytest.raises(ValueError, match=f"^{arg}: expected"):
        ops["paged_attention_out"](batch.q, batch.k_cache, batch.v_cache, out, **kwargs)
    assert (out == 7.0).all()


@pytest.mark.parametrize("changes,arg", [(dict(params=(True, (-1, -1))), "params"), (dict(softmax_scale=[1.0]), "softmax_scale")])
def test_varlen_wrong_types_are_named(changes, arg):
    ops = build_ops(make_torch_provider()[0])
    q, k, v, lens = packed_batch(lens=[5, 9], heads=4, kv_heads=2, head_dim=32)
    out = torch.full((14, 4, 32), 7.0, dtype=q.dtype)
    with pytest.raises(ValueError, match=f"^{arg}: expected"):
        ops["varlen_attention_out"](q, k, v, out, **lens, **changes)
    assert (out == 7.0).all()


@pytest.mark.parametrize("writes_out,original", [(True, False), (False, False), (True, True)], ids=["out=", "copying provider", "original"])
def test_out_on_another_device_is_named_on_every_path(writes_out, original):
    """FA3 refuses an `out` on another device; the paths that copy into `out` must not copy across devices."""
    ops = build_ops(make_torch_provider(writes_out=writes_out)[0], original=original)
    batch = paged_batch(**MIXED, heads=4, kv_heads=2, head_dim=32)
    plan = ops["make_attention_plan"](**batch.plan_args)
    with pytest.raises(ValueError, match="^out: expected device"):
        ops["paged_attention_out"](batch.q, batch.k_cache, batch.v_cache, batch.out().to("meta"), plan=plan)
    q, k, v, lens = packed_batch(lens=[5, 9], heads=4, kv_heads=2, head_dim=32)
    with pytest.raises(ValueError, match="^out: expected device"):
        ops["varlen_attention_out"](q, k, v, torch.empty(14, 128, dtype=q.dtype, device="meta"), **lens)
