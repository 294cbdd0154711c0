"""CPU: under torch.compile(fullgraph=True) the ops lower to the custom op that mutates ``out``, and the
compiled code neither clones ``out`` nor copies a result back into it."""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from attn_dispatch import reference
from attn_dispatch.plans import DEFAULT_PARAMS, AttentionParams
from attn_dispatch_cuda_fa3 import build_ops
from fa3_batches import packed_batch, paged_batch
from fa3_torch_provider import make_torch_provider
from torch._inductor.utils import run_and_get_code

SLIDING = AttentionParams(window_size=(8, 0))
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="Inductor's CPU backend needs a C++ compiler")),
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]),
]
CUSTOM_OP = "torch.ops.attn_dispatch_cuda_fa3.attention_out.default("


def compiled_code(fn, *args) -> str:
    torch._dynamo.reset()
    _, codes = run_and_get_code(torch.compile(fn, fullgraph=True, backend="inductor"), *args)
    return "\n".join(codes)


def assert_out_written_in_place(code: str, calls: int) -> None:
    assert code.count(CUSTOM_OP) == calls, code
    # Not re-inplaced, Inductor would clone `out` into a buffer for the op and copy it back at the end.
    assert not re.search(r"\bclone\b|\.copy_\(|aten\.copy", code), code


@pytest.mark.parametrize("device", DEVICES)
def test_paged_layers_compile_to_in_place_custom_op_calls(device):
    provider, calls = make_torch_provider()
    ops = build_ops(provider)
    batch = paged_batch(q_lens=[1, 4, 1], k_lens=[20, 9, 33], heads=4, kv_heads=2, head_dim=32, device=device)
    plan = ops["make_attention_plan"](**batch.plan_args, layer_params=(DEFAULT_PARAMS, SLIDING))

    def two_layers(q, k_cache, v_cache, out_global, out_sliding):
        ops["paged_attention_out"](q, k_cache, v_cache, out_global, plan=plan)
        ops["paged_attention_out"](q * 2, k_cache, v_cache, out_sliding, plan=plan, params=SLIDING)

    out_global, out_sliding = batch.out(), batch.out()
    code = compiled_code(two_layers, batch.q, batch.k_cache, batch.v_cache, out_global, out_sliding)
    assert_out_written_in_place(code, calls=2)
    assert calls.fwd_into_out == 2  # the provider was handed `out`'s own rows, once per layer

    want = batch.out()
    ref_plan = reference.make_attention_plan(**batch.plan_args, layer_params=(DEFAULT_PARAMS, SLIDING))
    reference.paged_attention_out(batch.q, batch.k_cache, batch.v_cache, want, plan=ref_plan)
    assert torch.equal(out_global, want)
    reference.paged_attention_out(batch.q * 2, batch.k_cache, batch.v_cache, want, plan=ref_plan, params=SLIDING)
    assert torch.equal(out_sliding, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("flat", [True, False])
def test_varlen_compiles_to_in_place_custom_op_call(flat, device):
    provider, calls = make_torch_provider()
    ops = build_ops(provider)
    q, k, v, lens = packed_batch(lens=[5, 9], heads=4, kv_heads=2, head_dim=32, device=device)
    out = torch.full((14, 128) if flat else (14, 4, 32), 7.0, dtype=q.dtype, device=device)

    def prefill(q, k, v, out):
        ops["varlen_attention_out"](q, k, v, out, **lens)

    code = compiled_code(prefill, q, k, v, out)
    assert_out_written_in_place(code, calls=1)
    want = torch.empty_like(out)
    reference.varlen_attention_out(q, k, v, want, **lens)
    assert torch.equal(out, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("packed", [False, True])
def test_bound_runs_compile_to_in_place_custom_op_calls(packed, device):
    """bind_attention's run, bound eagerly (per step), called inside a compiled model: the custom op, in place."""
    provider, calls = make_torch_provider()
    ops = build_ops(provider)
    if packed:
        q, k, v, lens = packed_batch(lens=[5, 9], heads=4, kv_heads=2, head_dim=32, device=device)
        plan = ops["make_attention_plan"](**lens, num_heads=4, num_kv_heads=2, head_dim=32)
        out = torch.full((14, 4, 32), 7.0, dtype=q.dtype, device=device)
        want = torch.empty_like(out)
        reference.varlen_attention_out(q, k, v, want, **lens)
    else:
        batch = paged_batch(q_lens=[1, 4, 1], k_lens=[20, 9, 33], heads=4, kv_heads=2, head_dim=32, device=device)
        q, k, v = batch.q, batch.k_cache, batch.v_cache
        plan = ops["make_attention_plan"](**batch.plan_args)
        out, want = batch.out(), batch.out()
        reference.paged_attention_out(q, k, v, want, plan=reference.make_attention_plan(**batch.plan_args))
    run = ops["bind_attention"](plan)

    def layer(q, k, v, out):
        run(q, k, v, out)

    code = compiled_code(layer, q, k, v, out)
    assert_out_written_in_place(code, calls=1)
    assert torch.equal(out, want)
