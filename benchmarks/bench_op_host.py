"""The Python time cuda_fa3's ``paged_attention_out``, ``bind_attention``'s run and ``varlen_attention_out``
(a repeat call, as every layer of a prefill step makes) add around the kernel call, on any machine (no GPU).

    python3 benchmarks/bench_op_host.py

The provider is a stand-in whose bound call returns at once, so what is timed is the op's own work per
layer (the fit check, the bound-call lookup, the view of ``out``; the run has no lookup) next to calling
the bound call directly.
On the H200 the same gap is measured against FA3's raw op by ``bench_fa3.py`` ("host us per layer call").
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "cuda_fa3" / "tests"))
from fa3_batches import paged_batch  # noqa: E402
from fa3_torch_provider import make_torch_provider  # noqa: E402

from attn_dispatch.plans import DEFAULT_PARAMS  # noqa: E402
from attn_dispatch_cuda_fa3 import build_ops  # noqa: E402
from attn_dispatch_cuda_fa3.plan import paged_args  # noqa: E402
from attn_dispatch_flash import FlashArgs, FlashProvider  # noqa: E402


def per_call_us(fn, calls: int = 20000, rounds: int = 15) -> float:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return min(samples)  # the least disturbed round: this measures Python work, not a machine's noise


def main() -> None:
    metadata = make_torch_provider()[0].scheduler_metadata
    provider = FlashProvider.from_binder("noop", 3, lambda args: lambda q, k, v, out: out, metadata, writes_out=True, has_seqused_q=True)
    ops = build_ops(provider)
    batch = paged_batch(q_lens=[1] * 8, k_lens=[64] * 8, heads=8, kv_heads=2, head_dim=64)
    plan = ops["make_attention_plan"](**batch.plan_args)
    out = torch.empty(batch.tokens, 8 * 64, dtype=torch.bfloat16)
    bound = provider.bind(paged_args(plan, DEFAULT_PARAMS, None, provider.name))
    rows = out.view(batch.tokens, 8, 64)
    q, k, v, op = batch.q, batch.k_cache, batch.v_cache, ops["paged_attention_out"]
    run = ops["bind_attention"](plan)
    through_op = per_call_us(lambda: op(q, k, v, out, plan=plan))
    through_run = per_call_us(lambda: run(q, k, v, rows))
    through_run_flat = per_call_us(lambda: run(q, k, v, out))
    direct = per_call_us(lambda: bound(q, k, v, rows))
    print(f"the bound kernel call alone {direct:.2f} us per call; on top of it: paged_attention_out +{through_op - direct:.2f} us, "
          f"bind_attention's run +{through_run - direct:.2f} us ([tokens, heads, dv] out), +{through_run_flat - direct:.2f} us (flat out)")

    # varlen_attention_out repeating the last call's lengths (every layer of a prefill step), flat out,
    # against the bound call with the flat out viewed per call (what the raw op's caller does too)
    tokens = 64
    cu = torch.tensor([0, 16, 40, 64], dtype=torch.int32)
    lengths = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=24, max_seqlen_k=24)
    qv, kv = torch.randn(tokens, 8, 64).bfloat16(), torch.randn(tokens, 2, 64).bfloat16()
    flat = torch.empty(tokens, 8 * 64, dtype=torch.bfloat16)
    varlen = ops["varlen_attention_out"]
    varlen(qv, kv, kv, flat, **lengths)
    bound_varlen = provider.bind(FlashArgs(**lengths, softmax_scale=64**-0.5, causal=True))
    through_varlen = per_call_us(lambda: varlen(qv, kv, kv, flat, **lengths))
    direct_varlen = per_call_us(lambda: bound_varlen(qv, kv, kv, flat.view(tokens, 8, 64)))
    print(f"varlen: the bound call with out viewed {direct_varlen:.2f} us per call; varlen_attention_out (a repeat "
          f"call) +{through_varlen - direct_varlen:.2f} us")


if __name__ == "__main__":
    main()
