"""Per-call cost of calling an op through the resolved ``Ops`` object vs calling the function directly.

    python benchmarks/bench_dispatch_overhead.py

Measurements, each the best of several timeit repeats (min is the right statistic for overhead: noise
only ever adds time):
1. a trivial function put into an ``Ops`` with ``dataclasses.replace``: isolates the lookup cost;
2. a real op with no device work (``mla_query_for_backend`` in prefill: argument checks, returns its inputs);
3. cuda_fa3's ``paged_attention_out`` and ``varlen_attention_out`` over vllm's raw-op adapter whose ops do
   nothing (CPU tensors): the plugin's host cost per layer, against calling the provider's bound raw call
   directly (what a hand-written engine does per layer).
For scale it also times a pluggy hook call, which the resolve-once design keeps off the per-layer path.
"""

from __future__ import annotations

import dataclasses
import timeit
import types

import pluggy
import torch

import attn_dispatch
from attn_dispatch import reference

NUMBER, REPEAT = 200_000, 9


def best_ns(stmt, number: int = NUMBER) -> float:
    return min(timeit.repeat(stmt, number=number, repeat=REPEAT)) / number * 1e9


def trivial(x, *, y):
    return x


def main() -> None:
    ops = attn_dispatch.load()
    bound = dataclasses.replace(ops, mla_decode_query=trivial)
    rows = []

    direct = best_ns(lambda: trivial(1, y=2))
    through = best_ns(lambda: bound.mla_decode_query(1, y=2))
    rows.append(("trivial function", direct, through))

    q_nope, q_rope = torch.randn(4, 16, 512), torch.randn(4, 16, 64)
    args = dict(is_decode=False, decode_impl="aiter")
    fn = reference.mla_query_for_backend
    direct = best_ns(lambda: fn(q_nope, q_rope, **args), number=50_000)
    through = best_ns(lambda: ops.mla_query_for_backend(q_nope, q_rope, **args), number=50_000)
    rows.append(("mla_query_for_backend (reference, prefill)", direct, through))

    rows += cuda_fa3_rows()

    pm = pluggy.PluginManager("bench")
    spec, impl = pluggy.HookspecMarker("bench"), pluggy.HookimplMarker("bench")

    class Spec:
        @spec(firstresult=True)
        def op(self, x):
            """one hook"""

    class Impl:
        @impl
        def op(self, x):
            return x

    pm.add_hookspecs(Spec)
    pm.register(Impl())
    hook_ns = best_ns(lambda: pm.hook.op(x=1), number=50_000)

    print(f"ops resolved on {ops.hardware}; torch {torch.__version__}; best of {REPEAT} repeats\n")
    print("| call | direct (ns) | through ops (ns) | extra (ns) |")
    print("|---|---|---|---|")
    for name, d, t in rows:
        print(f"| {name} | {d:.0f} | {t:.0f} | {t - d:+.0f} |")
    print(f"| (for scale) a pluggy firstresult hook call, one impl | - | {hook_ns:.0f} | - |")


def cuda_fa3_rows() -> list[tuple[str, float, float]]:
    """cuda_fa3's ops over a no-op raw FA3 op: (name, bound raw call ns, through the plugin ns)."""
    from attn_dispatch_cuda_fa3 import build_ops
    from attn_dispatch_flash import FlashArgs, raw_fa3_ops_provider

    def fwd(*args):
        return (args[6],)  # out

    def metadata(*args):
        return torch.zeros(16, dtype=torch.int32)

    provider = raw_fa3_ops_provider("noop_fa3", types.SimpleNamespace(fwd=fwd, get_scheduler_metadata=metadata))
    fa3 = build_ops(provider)
    batch, heads, kv_heads, dim, page = 4, 8, 2, 64, 16
    caches = [torch.zeros(batch * 4, page, kv_heads, dim, dtype=torch.bfloat16) for _ in range(2)]
    q = torch.zeros(batch, heads, dim, dtype=torch.bfloat16)
    out = torch.zeros(batch, heads * dim, dtype=torch.bfloat16)
    plan = fa3["make_attention_plan"](
        cache_seqlens=torch.full((batch,), 64, dtype=torch.int32), page_table=torch.arange(batch * 4, dtype=torch.int32).view(batch, 4),
        cu_seqlens_q=torch.arange(batch + 1, dtype=torch.int32), max_seqlen_q=1, max_seqlen_k=64, page_size=page,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=dim,
    )  # fmt: skip
    raw = provider.bind(
        FlashArgs(cu_seqlens_q=plan.cu_seqlens_q, seqused_k=plan.cache_seqlens, page_table=plan.page_table, max_seqlen_q=1,
                  max_seqlen_k=64, softmax_scale=dim**-0.5, causal=True, scheduler_metadata=plan.metadata[plan.layer_params[0]])
    )  # fmt: skip
    paged = fa3["paged_attention_out"]
    rows = [(
        "cuda_fa3 paged_attention_out (no-op raw FA3 op, CPU)",
        best_ns(lambda: raw(q, *caches, out.view(batch, heads, dim)), number=50_000),
        best_ns(lambda: paged(q, *caches, out, plan=plan), number=50_000),
    )]  # fmt: skip

    tokens = 64
    cu = torch.tensor([0, 16, 40, 64], dtype=torch.int32)
    qkv = [torch.zeros(tokens, h, dim, dtype=torch.bfloat16) for h in (heads, kv_heads, kv_heads)]
    out = torch.zeros(tokens, heads * dim, dtype=torch.bfloat16)
    lengths = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=24, max_seqlen_k=24)
    raw = provider.bind(FlashArgs(**lengths, softmax_scale=dim**-0.5, causal=True))
    varlen = fa3["varlen_attention_out"]
    rows.append((
        "cuda_fa3 varlen_attention_out (no-op raw FA3 op, CPU)",
        best_ns(lambda: raw(*qkv, out.view(tokens, heads, dim)), number=50_000),
        best_ns(lambda: varlen(*qkv, out, **lengths), number=50_000),
    ))  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
