"""One contract per op: every bad-input case raises ValueError naming the argument, and nothing is written.

The cases (``attn_dispatch.bad_inputs.CASES``) run here on the CPU references and on the plugin ops that
run on a CPU (rocm_nsa's cat-skip, rocm_mxfp4's float path); plugin GPU suites run the same cases on
their ops, so the reference refuses what the plugins refuse, with the same message.
"""

import pytest
import torch

from attn_dispatch import AttentionParams, OP_NAMES, reference
from attn_dispatch.bad_inputs import CASES, expect_refused

REFERENCE = {op: getattr(reference, op) for op in OP_NAMES}


def cpu_plugin_ops() -> dict[str, dict]:
    """Plugin ops whose refusals run on a CPU (their kernels are not reached by bad input)."""
    from attn_dispatch_rocm_mxfp4 import make_v_up_proj
    from attn_dispatch_rocm_nsa import build_ops

    return {"rocm_nsa": REFERENCE | build_ops(), "rocm_mxfp4": REFERENCE | {"mla_v_up_proj": make_v_up_proj(None)}}


PLUGIN_CASES = [
    pytest.param(name, case, id=f"{name}: {case.id}")
    for name, ops in cpu_plugin_ops().items()
    for case in CASES
    if ops[case.op] is not REFERENCE[case.op]
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_refuses_naming_the_argument(case, dtype):
    expect_refused(REFERENCE, case, "cpu", dtype)


@pytest.mark.parametrize("name, case", PLUGIN_CASES)
def test_cpu_plugin_ops_refuse_like_the_reference(name, case):
    plugin_message = expect_refused(cpu_plugin_ops()[name], case)
    assert plugin_message == expect_refused(REFERENCE, case)


def test_every_op_has_bad_input_cases():
    assert {case.op for case in CASES} == set(OP_NAMES)


def test_issue_mla_decode_query_mismatches_are_refused_not_reshaped():
    """Issue 10, High 3: these returned (6, 4, 20) and (3, 2, 80) before."""
    with pytest.raises(ValueError, match=r"^q: shape \(3, 4, 32\)"):
        reference.mla_decode_query(torch.randn(3, 4, 32), torch.randn(3, 4, 8), num_heads=4, kv_lora_rank=16, decode_impl="aiter")
    with pytest.raises(ValueError, match=r"^q: shape \(3, 4, 40\) has 4 heads, expected num_heads=2"):
        reference.mla_decode_query(torch.randn(3, 4, 40), None, num_heads=2, kv_lora_rank=32, decode_impl="aiter")


def test_masked_attention_gqa_is_computed_not_broadcast():
    """q with 2 heads against k with 1 head is GQA (one kv head serves both), the same as repeating k/v."""
    q, k, v = torch.randn(1, 5, 2, 8), torch.randn(1, 7, 1, 8), torch.randn(1, 7, 1, 8)
    meta = reference.build_mask_meta(torch.ones(1, 7, dtype=torch.bool))
    got = reference.masked_attention(q, k, v, meta)
    want = reference.masked_attention(q, k.expand(1, 7, 2, 8), v.expand(1, 7, 2, 8), meta)
    torch.testing.assert_close(got, want)


def test_planned_params_are_accepted_and_others_refused():
    """Engine code that passes on CPU passes on the GPU: a layer may only use params listed in the plan."""
    sliding = AttentionParams(window_size=(2, 0))
    case = next(c for c in CASES if c.id == "paged params not planned")
    args, kwargs = case.build(REFERENCE, torch.device("cpu"), torch.bfloat16)
    kwargs["plan"] = reference.make_attention_plan(**_replan(kwargs["plan"], layer_params=(AttentionParams(), sliding)))
    reference.paged_attention_out(*args, **kwargs)  # now planned: runs


def _replan(plan, **change) -> dict:
    names = ("cache_seqlens", "page_table", "cu_seqlens_q", "max_seqlen_q", "max_seqlen_k", "page_size", "num_heads",
             "num_kv_heads", "head_dim", "head_dim_v", "dtype")  # fmt: skip
    return {name: getattr(plan, name) for name in names} | change


def ops_with(**plugin_ops):
    """The CPU ops with some replaced by a 'plugin' implementation (as load() resolves them)."""
    import dataclasses

    import attn_dispatch
    from attn_dispatch.ops import Resolution

    ops = attn_dispatch.load("cpu", refresh=True)
    resolutions = dict(ops.resolutions) | {op: Resolution(op, "fake", fn.__name__) for op, fn in plugin_ops.items()}
    return dataclasses.replace(ops, **plugin_ops, resolutions=resolutions)


def test_selfcheck_runs_the_cases_on_plugin_ops():
    from attn_dispatch import selfcheck
    from attn_dispatch_rocm_nsa import build_ops

    results = [r for r in selfcheck.run(ops_with(**build_ops())) if r.case == "bad input refused"]
    assert [r.op for r in results] == ["mla_query_for_backend", "mla_decode_query"]
    assert all(r.passed and "refused naming the argument" in r.detail for r in results), results


def test_selfcheck_fails_a_plugin_op_that_skips_the_rules():
    from attn_dispatch import selfcheck

    def mla_decode_query(q, q_rope, *, num_heads, kv_lora_rank, decode_impl):  # reshapes whatever it gets
        q_all = q.reshape(q.shape[0], num_heads, -1) if q_rope is None else torch.cat([q, q_rope], -1)
        return q_all, q_all[..., :kv_lora_rank], q_all[..., kv_lora_rank:]

    (result,) = [r for r in selfcheck.run(ops_with(mla_decode_query=mla_decode_query)) if r.case == "bad input refused"]
    assert not result.passed and "accepted the input" in result.detail


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(window_size=128), "window_size"),
        (dict(window_size=(-2, 0)), "window_size"),
        (dict(window_size=(1.5, 0)), "window_size"),
        (dict(causal="yes"), "causal"),
        (dict(softcap=-1.0), "softcap"),
        (dict(num_splits=-1), "num_splits"),
        (dict(pack_gqa=1), "pack_gqa"),
    ],
)
def test_attention_params_refuse_what_no_kernel_schedules(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        AttentionParams(**kwargs)


def test_attention_params_window_as_a_list_is_a_hashable_tuple():
    assert AttentionParams(window_size=[8, 0]) == AttentionParams(window_size=(8, 0))
    assert hash(AttentionParams(window_size=[8, 0])) == hash(AttentionParams(window_size=(8, 0)))


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_cases_build_every_tensor_on_the_device_under_test(case):
    """A case tensor left on the CPU would, on the GPU, be refused for its device before the rule the case
    is about (the "meta" device stands in for the GPU: building a case needs no kernel)."""
    args, kwargs = case.build(REFERENCE, torch.device("meta"), torch.bfloat16)
    tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
    assert all(t.device.type == "meta" for t in tensors), [(t.device, tuple(t.shape)) for t in tensors]
