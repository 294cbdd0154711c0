"""Per-call cost of calling an op through the resolved ``Ops`` object vs calling the function directly.

    python benchmarks/bench_dispatch_overhead.py

Two measurements, each the best of several timeit repeats (min is the right statistic for overhead:
noise only ever adds time):
1. a trivial function put into an ``Ops`` with ``dataclasses.replace``: isolates the lookup cost;
2. a real op with no device work (``mla_query_for_backend`` in prefill: argument checks, returns its inputs).
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

    q_nope, q_rope = torch.randn(4, 16, 512), torch.randn(4, 16, 64)
    args = dict(is_decode=False, decode_impl="aiter")
    fn = reference.mla_query_for_backend
    direct = best_ns(lambda: fn(q_nope, q_rope, **args), number=50_000)
    through = best_ns(lambda: ops.mla_query_for_backend(q_nope, q_rope, **args), number=50_000)
    rows.append(("mla_query_for_backend (reference, prefill)", direct, through))

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
