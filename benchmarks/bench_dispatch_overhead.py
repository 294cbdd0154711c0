"""Per-call cost of calling an op through the resolved ``Ops`` object vs calling the function directly.

    python benchmarks/bench_dispatch_overhead.py

Two measurements, each the best of several timeit repeats (min is the right statistic for overhead:
noise only ever adds time):
1. a trivial function put into an ``Ops`` with ``dataclasses.replace``: isolates the lookup cost;
2. a real op (``mla_decode_query`` on a concatenated query: a view and two slices) on the host's tensors.
For scale it also times a pluggy hook call, which the resolve-once design keeps off the per-layer path.
"""

from __future__ import annotations

import dataclasses
import timeit

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

    q_cat = torch.randn(4, 16 * 576)
    args = dict(num_heads=16, kv_lora_rank=512, decode_impl="aiter")
    fn = reference.mla_decode_query
    direct = best_ns(lambda: fn(q_cat, None, **args), number=20_000)
    through = best_ns(lambda: ops.mla_decode_query(q_cat, None, **args), number=20_000)
    rows.append(("mla_decode_query (view path)", direct, through))

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


if __name__ == "__main__":
    main()
