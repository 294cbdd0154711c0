"""cuda_fa3 on one GPU: the original path vs the dispatched optimized path vs hand-written FA3 calls.

    python benchmarks/bench_fa3.py [--rounds 5] [--json results.json] [--quick]

Decode: a 32-layer step (32 q heads, 8 kv heads, head_dim 128, page 16, bf16, causal), each layer with its
own KV cache, replayed from a CUDA graph, for batch {1, 16, 64} x context {1024, 4096}. Paths:

* original: the pre-optimization path on the same kernels (``build_ops(provider, original=True)``): the
  kernel allocates its output, which is copied into the engine's buffer, and schedules itself per layer.
* dispatched: ``attn_dispatch.load()``'s ops; the plan is made inside the graph, so each replay runs the
  metadata kernel once, and ``bind_attention``'s run over it writes every layer into ``out``.
* dispatched, static plan: ``paged_attention_out`` with the plan made outside the graph and refreshed into
  the captured plan's persistent buffers before each replay (``static_plan=``); the refresh is timed too.
* hand-written: FA3's own Python functions called directly (metadata once, ``out=`` per layer), as an
  engine author writes them without the plugin (vllm's ``flash_attn_varlen_func``, what vLLM's backend calls).
* raw op: the same calls made on ``torch.ops._vllm_fa3_C`` with every argument spelled out, the floor for
  any Python layer (reported; the bar is against hand-written).

The optimized paths (dispatched, static plan, hand-written, raw op) write one shared output buffer, so buffer
placement cannot tell them apart; the original path writes its own, the reference for byte equality.

Prefill, 2048 and 8192 tokens in 4 causal sequences, reported per layer of a 32-layer step:

* paged (how sglang and vLLM run prefill on FA3): the new tokens' KV already in the paged cache, one
  plan per step, so the metadata is made once per step as in decode;
* varlen (``varlen_attention_out``, non-paged, FA3 schedules every call): out-aliasing only.

Both are replayed from a CUDA graph (GPU time, where identical kernels must time alike) and run eagerly,
as engines run prefill (a call whose Python + launch outlasts its kernel makes the step host-bound; the
host time per call is printed for each path).

Timing: ``triton.testing.do_bench`` medians (L2 flushed between calls), paths interleaved over rounds and
the median across rounds kept. Kernel counts per step come from ``torch.profiler`` (graph replays and,
as a cross-check, the same step run eagerly). Prints a markdown table last. Without a CUDA device it says
so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from attn_dispatch_flash import FlashArgs

LAYERS, HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 32, 8, 128, 16
DTYPE = torch.bfloat16
SCALE = HEAD_DIM**-0.5
DECODE_CASES = [(1, 1024), (1, 4096), (16, 1024), (16, 4096), (64, 1024), (64, 4096)]
PREFILL_TOKENS = [2048, 8192]
PREFILL_SEQUENCES = 4
DECODE_PATHS = ("original", "dispatched", "dispatched_static", "hand_written", "raw_op")
PREFILL_PATHS = ("original", "dispatched", "hand_written", "raw_op")


@dataclass
class Result:
    case: str
    times_us: dict[str, float]
    counts_graph: dict[str, dict[str, float]] = field(default_factory=dict)  # path -> kernel kind -> per step
    counts_eager: dict[str, dict[str, float]] = field(default_factory=dict)
    names_graph: dict[str, dict[str, float]] = field(default_factory=dict)  # path -> GPU activity name -> per step
    equal: bool = True
    host_us: dict[str, float] = field(default_factory=dict)  # eager only: host time per call, by path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9, help="interleaved decode timing rounds (median kept)")
    parser.add_argument("--prefill-rounds", type=int, default=11, help="interleaved prefill timing rounds")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--quick", action="store_true", help="B=1 ctx=1024 decode and 2k prefill only")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_fa3: no CUDA device here; run it on an sm90 GPU with an FA3 provider (nothing measured)")
        return 0

    import attn_dispatch
    from attn_dispatch.cli import format_info
    from attn_dispatch_cuda_fa3 import build_ops, resolve_provider, stats

    ops = attn_dispatch.load()
    print(format_info(ops), flush=True)
    if ops.resolutions["paged_attention_out"].plugin != "cuda_fa3":
        print(f"bench_fa3: cuda_fa3 is not active here ({ops.summary()})")
        return 1
    provider = resolve_provider(ops.hardware.arch)
    paths = Paths(
        dispatched=ops, original=build_ops(provider, original=True), hand=HandWritten(provider, "public"),
        raw=HandWritten(provider, "raw"),
    )  # fmt: skip
    print(f"provider: {provider.describe()}; hand-written: {paths.hand.kind}; raw op: {paths.raw.kind}", flush=True)
    kernel_counts(lambda: torch.zeros(1, device="cuda").add_(1))  # start CUPTI before any graph is captured

    results = []
    runs = [(bench_paged, (batch, ctx, args.rounds)) for batch, ctx in DECODE_CASES[: 1 if args.quick else None]]
    for tokens in PREFILL_TOKENS[: 1 if args.quick else None]:
        seq = tokens // PREFILL_SEQUENCES
        runs.append((bench_paged, (PREFILL_SEQUENCES, seq, args.prefill_rounds, seq)))
        runs.append((bench_varlen_prefill, (tokens, args.prefill_rounds)))
    for bench, bench_args in runs:
        for result in bench(paths, *bench_args):
            results.append(result)
            print(row(result), flush=True)
        torch.cuda.empty_cache()
    print(f"\nattn_dispatch_cuda_fa3.stats after the run: {stats.as_dict()}")
    first = results[0]
    for path, names in first.names_graph.items():  # what the counts are made of, once
        print(f"GPU activity per replayed step, {first.case}, {path}: " + "; ".join(f"{n[:70]} x{c:g}" for n, c in names.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "provider": provider.describe(), "results": [asdict(r) for r in results]}, f, indent=2)
    print(bars(results))
    print("\n" + table(results))
    return 0


@dataclass
class Paths:
    dispatched: object  # attn_dispatch Ops
    original: dict[str, Callable]
    hand: HandWritten
    raw: HandWritten


class HandWritten:
    """FA3 called directly, without the plugin, two ways (vllm's FA3; any other provider: its adapter, twice).

    * ``api="public"``, the hand-written path: the package's Python functions, as engines call them
      (vLLM's backend calls ``vllm_flash_attn.flash_attn_varlen_func(..., out=, scheduler_metadata=)``,
      sglang ``sgl_kernel``'s ``flash_attn_with_kvcache``; the seed PRs hand-wrote exactly those calls).
    * ``api="raw"``, the floor: ``torch.ops._vllm_fa3_C`` called with all 37 arguments spelled out, no
      Python between the call and the dispatcher. Nobody writes an engine this way; it shows what any
      Python layer, the plugin's included, costs per call.
    """

    def __init__(self, provider, api: str) -> None:
        self.provider, self.api = provider, api
        self.vllm = provider.name == "vllm_fa3"
        if not self.vllm:
            self.kind = f"{provider.name} adapter"
        elif api == "raw":
            self.kind = "torch.ops._vllm_fa3_C.fwd"
        else:
            from vllm.vllm_flash_attn import flash_attn_varlen_func, get_scheduler_metadata

            self.public_fwd, self.public_metadata = flash_attn_varlen_func, get_scheduler_metadata
            self.kind = "vllm.vllm_flash_attn.flash_attn_varlen_func"

    def metadata(self, *, batch, max_seqlen_q, max_seqlen_k, cache_seqlens, cu_seqlens_q) -> torch.Tensor:
        if self.vllm and self.api == "raw":
            return torch.ops._vllm_fa3_C.get_scheduler_metadata(
                batch, max_seqlen_q, max_seqlen_k, HEADS, KV_HEADS, HEAD_DIM, HEAD_DIM, DTYPE, cache_seqlens,
                cu_seqlens_q, None, None, None, None, PAGE, 0, True, -1, -1, False, 0, None, 0,
            )  # fmt: skip
        if self.vllm:
            return self.public_metadata(
                batch, max_seqlen_q, max_seqlen_k, HEADS, KV_HEADS, HEAD_DIM, cache_seqlens, qkv_dtype=DTYPE,
                headdim_v=HEAD_DIM, cu_seqlens_q=cu_seqlens_q, page_size=PAGE, causal=True,
            )  # fmt: skip
        return self.provider.scheduler_metadata(
            batch_size=batch, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, num_heads=HEADS,
            num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, head_dim_v=HEAD_DIM, cache_seqlens=cache_seqlens,
            cu_seqlens_q=cu_seqlens_q, page_size=PAGE, dtype=DTYPE, causal=True, window_size=(-1, -1),
            softcap=0.0, num_splits=0, pack_gqa=None,
        )  # fmt: skip

    def fwd(self, q, k, v, out, a: FlashArgs) -> None:
        """One forward into ``out`` with the causal, unwindowed arguments ``a`` (made once per step)."""
        if self.vllm and self.api == "raw":
            torch.ops._vllm_fa3_C.fwd(
                q, k, v, None, None, None, out, a.cu_seqlens_q, a.cu_seqlens_k, None, None, a.seqused_k,
                a.max_seqlen_q, a.max_seqlen_k, a.page_table, None, None, None, None, None, None, None, None,
                a.softmax_scale, a.causal, -1, -1, 0.0, True, a.scheduler_metadata, 0, None, 0, None, 1, 0, None,
            )  # fmt: skip
            return
        if self.vllm:
            self.public_fwd(
                q, k, v, a.max_seqlen_q, a.cu_seqlens_q, a.max_seqlen_k, cu_seqlens_k=a.cu_seqlens_k,
                seqused_k=a.seqused_k, softmax_scale=a.softmax_scale, causal=a.causal, block_table=a.page_table,
                out=out, scheduler_metadata=a.scheduler_metadata, fa_version=3,
            )  # fmt: skip
            return
        self.provider.bind(a)(q, k, v, out)


class PagedStep:
    """One 32-layer step of paged attention: ``batch`` sequences with ``ctx`` keys each, ``q_per_seq`` new
    tokens each (1: decode; ``ctx``: a fresh prefill whose KV the engine has written into the cache).

    Every layer has its own KV cache and queries. The optimized paths (dispatched, static plan,
    hand-written) write one shared output buffer, so no placement difference between their buffers can
    show up as a timing difference; the original path writes its own, the reference for byte equality.
    """

    def __init__(self, batch: int, ctx: int, q_per_seq: int = 1) -> None:
        dev = "cuda"
        columns = ctx // PAGE
        pages = batch * columns
        tokens = batch * q_per_seq
        g = torch.Generator(device=dev).manual_seed(batch * 100_003 + ctx * 7 + q_per_seq)
        self.batch, self.tokens, self.q_per_seq = batch, tokens, q_per_seq
        self.k = torch.empty(LAYERS, pages, PAGE, KV_HEADS, HEAD_DIM, dtype=DTYPE, device=dev).normal_(generator=g)
        self.v = torch.empty_like(self.k).normal_(generator=g)
        self.q = torch.empty(LAYERS, tokens, HEADS, HEAD_DIM, dtype=DTYPE, device=dev).normal_(generator=g)
        optimized = torch.zeros(LAYERS, tokens, HEADS * HEAD_DIM, dtype=DTYPE, device=dev)
        self.outs = {path: optimized for path in DECODE_PATHS}
        self.outs["original"] = torch.zeros_like(optimized)
        # [layers, tokens, heads, d] views: what FA3 writes, handed to the raw op, hand-written FA3 and the run alike
        self.rows = {path: out.view(LAYERS, tokens, HEADS, HEAD_DIM) for path, out in self.outs.items()}
        self.plan_args = dict(
            cache_seqlens=torch.full((batch,), ctx, dtype=torch.int32, device=dev),
            page_table=torch.randperm(pages, device=dev, generator=g).to(torch.int32).view(batch, columns),
            cu_seqlens_q=torch.arange(0, tokens + 1, q_per_seq, dtype=torch.int32, device=dev),
            max_seqlen_q=q_per_seq, max_seqlen_k=ctx, page_size=PAGE, num_heads=HEADS, num_kv_heads=KV_HEADS,
            head_dim=HEAD_DIM, dtype=DTYPE,
        )  # fmt: skip

    def run_layers(self, run: Callable, path: str) -> None:
        rows = self.rows[path]
        for layer in range(LAYERS):
            run(self.q[layer], self.k[layer], self.v[layer], rows[layer])

    def layers(self, paged_attention_out: Callable, plan, path: str) -> None:
        out = self.outs[path]
        for layer in range(LAYERS):
            paged_attention_out(self.q[layer], self.k[layer], self.v[layer], out[layer], plan=plan)

    def hand_written(self, hand: HandWritten, path: str = "hand_written") -> None:
        a = self.plan_args
        metadata = hand.metadata(
            batch=self.batch, max_seqlen_q=self.q_per_seq, max_seqlen_k=a["max_seqlen_k"],  # what vllm's fwd schedules for
            cache_seqlens=a["cache_seqlens"], cu_seqlens_q=a["cu_seqlens_q"],
        )  # fmt: skip
        args = FlashArgs(
            cu_seqlens_q=a["cu_seqlens_q"], seqused_k=a["cache_seqlens"], page_table=a["page_table"],
            max_seqlen_q=self.q_per_seq, max_seqlen_k=a["max_seqlen_k"], softmax_scale=SCALE, causal=True,
            scheduler_metadata=metadata,
        )  # fmt: skip
        rows = self.rows[path]
        for layer in range(LAYERS):
            hand.fwd(self.q[layer], self.k[layer], self.v[layer], rows[layer], args)

    def all_equal(self, runs: dict[str, Callable[[], None]]) -> bool:
        """Run each path once (original first) and compare its output bytes with the original's."""
        runs["original"]()
        torch.cuda.synchronize()
        reference, shared = self.outs["original"].clone(), self.outs["dispatched"]
        equal = True
        for path, run in runs.items():
            if path != "original":
                shared.zero_()
                run()
                torch.cuda.synchronize()
                equal = equal and torch.equal(shared, reference)
        return equal


def bench_paged(paths: Paths, batch: int, ctx: int, rounds: int, q_per_seq: int = 1) -> list[Result]:
    """A paged step, replayed from CUDA graphs; a prefill step (``q_per_seq > 1``) is also timed eagerly."""
    step = PagedStep(batch, ctx, q_per_seq)
    ops, original = paths.dispatched, paths.original
    original_plan = original["make_attention_plan"](**step.plan_args)
    static_plan = ops.make_attention_plan(**step.plan_args)
    in_graph: dict[str, object] = {}

    def dispatched_step() -> None:
        """A plan per step (inside the capture: replayed per step) and its bound run per layer, as an engine
        holding ``bind_attention``'s run calls it."""
        in_graph["plan"] = ops.make_attention_plan(**step.plan_args)
        step.run_layers(ops.bind_attention(in_graph["plan"]), "dispatched")

    eager = {
        "original": lambda: step.layers(original["paged_attention_out"], original_plan, "original"),
        "dispatched": dispatched_step,
        "dispatched_static": lambda: step.layers(ops.paged_attention_out, static_plan, "dispatched_static"),
        "hand_written": lambda: step.hand_written(paths.hand),
        "raw_op": lambda: step.hand_written(paths.raw, "raw_op"),
    }
    graphs = capture_all(eager)

    def refresh_and_replay() -> None:
        ops.make_attention_plan(**step.plan_args, static_plan=static_plan)
        graphs["dispatched_static"].replay()

    replays = {path: graph.replay for path, graph in graphs.items()}
    replays["dispatched_static"] = refresh_and_replay
    eager["dispatched_static"] = lambda: (ops.make_attention_plan(**step.plan_args, static_plan=static_plan), step.layers(ops.paged_attention_out, static_plan, "dispatched_static"))
    equal = step.all_equal(replays) and step.all_equal(dict(eager))

    times = time_interleaved(replays, rounds)
    graph_names = {path: kernel_names(fn) for path, fn in replays.items()}
    counts_graph = {path: classify(names) for path, names in graph_names.items()}
    counts_eager = {path: classify(kernel_names(fn)) for path, fn in eager.items()}
    layer_host_us(step, ops, static_plan, paths.raw)
    if q_per_seq == 1:
        host = {path: host_us_per_call(eager[path]) for path in ("dispatched_static", "raw_op")}
        return [Result(f"decode B={batch} ctx={ctx}", times, counts_graph, counts_eager, graph_names, equal, host_us=host)]
    name = f"prefill {step.tokens} tok ({batch} seq), paged, per layer"
    per_layer = {path: t / LAYERS for path, t in times.items()}
    eager_paths = {path: eager[path] for path in PREFILL_PATHS}
    eager_times = {path: t / LAYERS for path, t in time_interleaved(eager_paths, rounds).items()}
    host = {path: host_us_per_call(fn) for path, fn in eager_paths.items()}
    print(f"{name}: host time per eager call (Python + launch, us): " + ", ".join(f"{p} {t:.1f}" for p, t in host.items()))
    return [
        Result(f"{name}, CUDA graph", per_layer, counts_graph, counts_eager, graph_names, equal),
        Result(f"{name}, eager", eager_times, counts_eager=counts_eager, equal=equal, host_us=host),
    ]


def bench_varlen_prefill(paths: Paths, tokens: int, rounds: int) -> list[Result]:
    """A 32-layer step of varlen (non-paged) prefill calls, FA3 scheduling each (no plan): out-aliasing only.
    Timed in a CUDA graph (GPU time) and eagerly. Dispatched and hand-written share one output buffer."""
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(tokens)
    q = torch.empty(tokens, HEADS, HEAD_DIM, dtype=DTYPE, device=dev).normal_(generator=g)
    k, v = (torch.empty(tokens, KV_HEADS, HEAD_DIM, dtype=DTYPE, device=dev).normal_(generator=g) for _ in range(2))
    seq = tokens // PREFILL_SEQUENCES
    cu = torch.arange(0, tokens + 1, seq, dtype=torch.int32, device=dev)
    lengths = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=seq, max_seqlen_k=seq)
    shared = torch.zeros(LAYERS, tokens, HEADS * HEAD_DIM, dtype=DTYPE, device=dev)
    outs = {"original": torch.zeros_like(shared), "dispatched": shared, "hand_written": shared, "raw_op": shared}
    original, dispatched = paths.original["varlen_attention_out"], paths.dispatched.varlen_attention_out
    hand, raw = paths.hand.fwd, paths.raw.fwd
    args = FlashArgs(**lengths, softmax_scale=SCALE, causal=True)

    def step(call: Callable[[torch.Tensor], object], path: str) -> Callable[[], None]:
        def run() -> None:
            for layer_out in outs[path]:
                call(layer_out)

        return run

    outs["planned"] = shared
    rows_3d = shared.view(LAYERS, tokens, HEADS, HEAD_DIM)

    def planned_step() -> None:
        """A packed plan per step (metadata once), then bind_attention's run per layer, out as [tokens, H, D]."""
        plan = paths.dispatched.make_attention_plan(
            **lengths, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype=DTYPE
        )  # fmt: skip
        run = paths.dispatched.bind_attention(plan)
        for layer_out in rows_3d:
            run(q, k, v, layer_out)

    steps = {
        "original": step(lambda out: original(q, k, v, out, **lengths), "original"),
        "dispatched": step(lambda out: dispatched(q, k, v, out, **lengths), "dispatched"),
        "hand_written": step(lambda out: hand(q, k, v, out.view(tokens, HEADS, HEAD_DIM), args), "hand_written"),
        "raw_op": step(lambda out: raw(q, k, v, out.view(tokens, HEADS, HEAD_DIM), args), "raw_op"),
        "planned": planned_step,
    }
    steps["original"]()
    equal = True
    for path in ("dispatched", "hand_written", "raw_op", "planned"):
        shared.zero_()
        steps[path]()
        equal = equal and torch.equal(shared, outs["original"])
    counts = {path: classify(kernel_names(fn)) for path, fn in steps.items()}
    graphs = capture_all(steps)
    replays = {path: graph.replay for path, graph in graphs.items()}
    name = f"varlen prefill {tokens} tok ({PREFILL_SEQUENCES} seq), no plan, per layer"
    in_graph = {path: t / LAYERS for path, t in time_interleaved(replays, rounds).items()}
    eager = {path: t / LAYERS for path, t in time_interleaved(steps, rounds).items()}
    host = {path: host_us_per_call(fn) for path, fn in steps.items()}
    print(f"{name}: host time per eager call (Python + launch, us): " + ", ".join(f"{p} {t:.1f}" for p, t in host.items()))
    plan = paths.dispatched.make_attention_plan(**lengths, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype=DTYPE)
    run, bound = paths.dispatched.bind_attention(plan), paths.raw.provider.bind(args)
    flat_out = lambda layer: shared[layer].view(tokens, HEADS, HEAD_DIM)  # noqa: E731
    host_us_in_turns(
        f"host us per varlen call, no plan ({tokens} tokens)",
        {
            "varlen_attention_out": lambda layer: dispatched(q, k, v, shared[layer], **lengths),
            "bind_attention run (packed plan)": lambda layer: run(q, k, v, rows_3d[layer]),
            "raw op": lambda layer: raw(q, k, v, flat_out(layer), args),
            "raw op, laid out": lambda layer: bound(q, k, v, flat_out(layer)),
        },
        subject="varlen_attention_out",
    )  # fmt: skip
    planned_prepares = counts["planned"].get("prepare_varlen_num_blocks", 0.0)
    print(f"{name}: packed plan + bind_attention (planned) vs varlen_attention_out (dispatched): graph "
          f"{in_graph['planned']:.1f} vs {in_graph['dispatched']:.1f} us, eager {eager['planned']:.1f} vs "
          f"{eager['dispatched']:.1f} us, host {host['planned']:.1f} vs {host['dispatched']:.1f} us per layer; "
          f"prepare_varlen_num_blocks per step {planned_prepares:g} vs {counts['dispatched'].get('prepare_varlen_num_blocks', 0.0):g} "
          f"({'PASS' if planned_prepares == 1 else 'FAIL'}: 1 per step); bytes equal: {equal}", flush=True)  # fmt: skip
    return [
        Result(f"{name}, CUDA graph", in_graph, counts_eager=counts, equal=equal),
        Result(f"{name}, eager", eager, counts_eager=counts, equal=equal, host_us=host),
    ]


def layer_host_us(step, ops, plan, raw_op: HandWritten) -> None:
    """Issue 13's bar: host time of one layer's call with the batch's plan already made, against FA3's raw op.

    Paths: ``bind_attention``'s run (the per-layer call an engine holds; out as ``[tokens, heads, d]``, the
    layout FA3 writes), ``paged_attention_out`` for reference (flat out: one view per call), the raw op as
    the issue measured it (``torch.ops._vllm_fa3_C.fwd`` with its 37 arguments spelled out per call), and
    the provider's own bound call (the raw op with the very arguments the run binds, laid out once: the
    floor, so only our Python differs)."""
    from attn_dispatch.plans import DEFAULT_PARAMS
    from attn_dispatch_cuda_fa3.plan import paged_args

    args = paged_args(plan, DEFAULT_PARAMS, None, raw_op.provider.name)
    bound = raw_op.provider.bind(args)
    out = step.outs["dispatched_static"]
    rows = out.view(out.shape[0], step.tokens, HEADS, HEAD_DIM)
    run = ops.bind_attention(plan)
    q, k, v = step.q, step.k, step.v
    calls = {
        "bind_attention run": lambda layer: run(q[layer], k[layer], v[layer], rows[layer]),
        "paged_attention_out": lambda layer: ops.paged_attention_out(q[layer], k[layer], v[layer], out[layer], plan=plan),
        "raw op": lambda layer: raw_op.fwd(q[layer], k[layer], v[layer], rows[layer], args),
        "raw op, laid out": lambda layer: bound(q[layer], k[layer], v[layer], rows[layer]),
    }  # fmt: skip
    host_us_in_turns(f"host us per layer call, plan made ({step.tokens} tokens)", calls, subject="bind_attention run")


def host_us_in_turns(title: str, calls: dict[str, Callable[[int], object]], subject: str, reps: int = 3, rounds: int = 45) -> dict:
    """Host us per call of each ``calls[name](layer)`` (``LAYERS`` layers), against ``calls["raw op"]`` and
    ``calls["raw op, laid out"]``, with the GPU kept busy (``torch.cuda._sleep``) so no launch waits for it.
    Prints four statistics, each with issue 13's bar for ``subject`` (raw op + 3%); returns the paired one."""
    import time

    names = list(calls)

    def report(label: str, us: dict[str, float]) -> None:
        ours, raw_us = us[subject], us["raw op"]
        print(f"{title}, {label}: " + ", ".join(f"{name} {t:.2f}" for name, t in us.items())
              + f" ({subject} {(ours / raw_us - 1) * 100:+.1f}% vs raw op, "
              f"{(ours / us['raw op, laid out'] - 1) * 100:+.1f}% vs laid out; issue 13 bar: <= raw op +3%: "
              f"{'PASS' if ours <= raw_us * 1.03 else 'FAIL'})", flush=True)  # fmt: skip

    # Rounds: each path's layers x reps timed together, order rotated per round.
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        turn = names[round_ % len(names) :] + names[: round_ % len(names)]  # rotated: no path always goes first
        for name in turn:
            calls[name](0)
            torch.cuda.synchronize()
            torch.cuda._sleep(int(5e8))  # outlasts the timed launches (few enough not to fill the launch queue)
            start = time.perf_counter()
            for _ in range(reps):
                for layer in range(LAYERS):
                    calls[name](layer)
            samples[name].append((time.perf_counter() - start) / (reps * LAYERS) * 1e6)
            torch.cuda.synchronize()
    # Python's own time is deterministic and the host's noise only adds to it, so the least disturbed round
    # (min) measures it best; the median is printed next to it.
    for stat in (min, statistics.median):
        report(f"{stat.__name__} of {rounds} rounds", {name: stat(samples[name]) for name in names})

    # Call by call: the paths take turns per layer (order rotated per round), each call timed alone, so
    # drift in the host's speed hits every path alike. Paired: each call's time minus the raw op's call
    # made next to it, whose median cancels drift that the per-path medians keep.
    per_call: dict[str, list[int]] = {name: [] for name in names}
    clock = time.perf_counter_ns
    for round_ in range(rounds):
        torch.cuda.synchronize()
        torch.cuda._sleep(int(5e8))
        turn = names[round_ % len(names) :] + names[: round_ % len(names)]
        for layer in range(LAYERS):
            for name in turn:
                call = calls[name]
                start = clock()
                call(layer)
                per_call[name].append(clock() - start)
        torch.cuda.synchronize()
    medians = {name: statistics.median(per_call[name]) / 1e3 for name in names}
    report(f"median of {rounds * LAYERS} calls taken in turns", medians)
    raw_median = medians["raw op"]
    paired = {
        name: raw_median + statistics.median(a - b for a, b in zip(per_call[name], per_call["raw op"])) / 1e3
        for name in names
    }  # fmt: skip
    report("raw op's median + the median paired difference", paired)
    return paired


def host_us_per_call(step: Callable[[], None], repeats: int = 21) -> float:
    """Median host time of one eager call (a step's calls / LAYERS), GPU idle at the start of each step."""
    import time

    samples = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        samples.append((time.perf_counter() - start) / LAYERS * 1e6)
    torch.cuda.synchronize()
    return statistics.median(samples)


def capture_all(fns: dict[str, Callable[[], None]]) -> dict[str, torch.cuda.CUDAGraph]:
    """One graph per path, all in one memory pool: the kernels' own temporaries (softmax_lse, split-KV
    accumulators, metadata) land at the same addresses in every path's graph, so placement cannot tell
    identical kernel sequences apart. Safe because the graphs replay one at a time on one stream."""
    pool = torch.cuda.graph_pool_handle()
    return {path: capture(fn, pool) for path, fn in fns.items()}


def capture(fn: Callable[[], None], pool=None) -> torch.cuda.CUDAGraph:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the graph
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        fn()
    return graph


def time_interleaved(fns: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    """Median over rounds of each path's do_bench median (µs). Paths are interleaved, and the order rotates
    every round, so clock and neighbour drift hit every path alike."""
    from triton.testing import do_bench

    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            samples[name].append(do_bench(fns[name], warmup=10, rep=200, return_mode="median") * 1e3)
    return {name: statistics.median(samples[name]) for name in names}


def kernel_names(fn: Callable[[], None], steps: int = 4) -> dict[str, float]:
    """GPU activities (kernels, memcpys, memsets) per step, by name, from torch.profiler."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    names = Counter(event.name for event in prof.events() if event.device_type == DeviceType.CUDA)
    return {name: count / steps for name, count in sorted(names.items())}


def kernel_counts(fn: Callable[[], None]) -> dict[str, float]:
    return classify(kernel_names(fn))


def classify(names: dict[str, float]) -> dict[str, float]:
    kinds: Counter[str] = Counter()
    for name, per_step in names.items():
        if "Memcpy DtoD" in name:
            kind = "memcpy_dtod"
        elif "Memset" in name:
            kind = "memset"
        elif "prepare_varlen_num_blocks" in name:
            kind = "prepare_varlen_num_blocks"
        elif "Memcpy" in name:
            kind = "memcpy_other"
        else:
            kind = "other_kernels"
        kinds[kind] += per_step
    return dict(sorted(kinds.items()))


def row(r: Result) -> str:
    t = r.times_us
    return f"{r.case}: " + ", ".join(f"{path} {t[path]:.1f} us" for path in t) + f"; outputs equal: {r.equal}"


def _counts(r: Result, path: str, kind: str) -> str:
    graph = r.counts_graph.get(path, {}).get(kind)
    eager = r.counts_eager.get(path, {}).get(kind, 0.0)
    text = f"{eager:g}" if graph is None else f"{graph:g}"
    if graph is not None and graph != eager:
        text += f" (eager {eager:g})"
    return text


def table(results: list[Result]) -> str:
    lines = [
        "| case | original µs | dispatched µs | dispatched, static plan µs | hand-written µs | raw op µs | dispatched vs hand-written | dispatched vs raw op | dispatched vs original | DtoD / step (orig → disp) | prepare_varlen_num_blocks / step (orig → disp) | bytes equal | host µs / eager call, dispatched vs raw op |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        t = r.times_us
        static = f"{t['dispatched_static']:.1f}" if "dispatched_static" in t else "–"
        vs_hand = (t["dispatched"] / t["hand_written"] - 1) * 100
        vs_raw = (t["dispatched"] / t["raw_op"] - 1) * 100
        vs_orig = (1 - t["dispatched"] / t["original"]) * 100
        dtod = f"{_counts(r, 'original', 'memcpy_dtod')} → {_counts(r, 'dispatched', 'memcpy_dtod')}"
        prep = f"{_counts(r, 'original', 'prepare_varlen_num_blocks')} → {_counts(r, 'dispatched', 'prepare_varlen_num_blocks')}"
        if "dispatched_static" in t:  # its metadata refresh copies into the persistent buffer: show it
            dtod += f" (static plan: {_counts(r, 'dispatched_static', 'memcpy_dtod')})"
            prep += f" (static plan: {_counts(r, 'dispatched_static', 'prepare_varlen_num_blocks')})"
        lines.append(
            f"| {r.case} | {t['original']:.1f} | {t['dispatched']:.1f} | {static} | {t['hand_written']:.1f} | {t['raw_op']:.1f} | "
            f"{vs_hand:+.2f}% | {vs_raw:+.2f}% | {vs_orig:.1f}% faster | {dtod} | {prep} | {'yes' if r.equal else 'NO'} | {_host(r)} |"
        )
    return "\n".join(lines)


def _host(r: Result) -> str:
    """Host time per eager call (CPU timer), the dispatched path against the raw op: what the plugin's Python
    costs per layer. Decode reports the static-plan path (its per-step plan refresh is amortised over the
    layers), prefill the dispatched one."""
    dispatched = r.host_us.get("dispatched", r.host_us.get("dispatched_static"))
    raw = r.host_us.get("raw_op")
    if dispatched is None or raw is None:
        return "–"
    return f"{dispatched:.1f} vs {raw:.1f} ({dispatched - raw:+.1f})"


def bars(results: list[Result]) -> str:
    """The issue's bars, each with its verdict."""
    lines = ["", "bars:"]
    # GPU time: decode and prefill replayed from CUDA graphs (identical kernels must time alike).
    timed = [r for r in results if not r.case.endswith("eager")]
    worst = max(timed, key=lambda r: abs(r.times_us["dispatched"] / r.times_us["hand_written"] - 1))
    gap = (worst.times_us["dispatched"] / worst.times_us["hand_written"] - 1) * 100
    lines.append(f"- dispatched within 1% of hand-written, GPU time (graph replays): {'PASS' if abs(gap) <= 1 else 'FAIL'} (largest gap {gap:+.2f}% at {worst.case})")
    slowest = max(timed, key=lambda r: r.times_us["dispatched"] / r.times_us["hand_written"])
    gap = (slowest.times_us["dispatched"] / slowest.times_us["hand_written"] - 1) * 100
    lines.append(f"- dispatched no more than 1% slower than hand-written, GPU time: {'PASS' if gap <= 1 else 'FAIL'} (slowest {gap:+.2f}% at {slowest.case})")
    raw = max(timed, key=lambda r: abs(r.times_us["dispatched"] / r.times_us["raw_op"] - 1))
    gap = (raw.times_us["dispatched"] / raw.times_us["raw_op"] - 1) * 100
    lines.append(f"- (floor) dispatched vs the raw op, GPU time: largest gap {gap:+.2f}% at {raw.case}")
    for r in results:
        if r.case.endswith("eager"):  # host-bound when one call's Python + launch outlasts its kernel
            gap = (r.times_us["dispatched"] / r.times_us["hand_written"] - 1) * 100
            host = ", ".join(f"{path} {t:.1f}" for path, t in r.host_us.items())
            raw_gap = (r.times_us["dispatched"] / r.times_us["raw_op"] - 1) * 100
            lines.append(f"- dispatched no more than 1% slower than hand-written, {r.case}: {'PASS' if gap <= 1 else 'FAIL'} ({gap:+.2f}%; vs the raw op floor {raw_gap:+.2f}%); host us per call: {host}")
    first = next((r for r in results if r.case == "decode B=1 ctx=1024"), None)
    if first is not None:
        speedup = (1 - first.times_us["dispatched"] / first.times_us["original"]) * 100
        lines.append(f"- B=1 ctx=1024 >= 10% faster than original: {'PASS' if speedup >= 10 else 'FAIL'} ({first.times_us['original']:.1f} -> {first.times_us['dispatched']:.1f} us, {speedup:.1f}%)")
    planned = [r for r in results if r.case.startswith("decode") or r.case.endswith("paged, per layer, CUDA graph")]
    for source in ("counts_graph", "counts_eager"):
        ok = all(
            _per_step(r, source, "dispatched", "memcpy_dtod") == 0 and _per_step(r, source, "dispatched", "prepare_varlen_num_blocks") == 1
            and _per_step(r, source, "original", "memcpy_dtod") == LAYERS and _per_step(r, source, "original", "prepare_varlen_num_blocks") == LAYERS
            for r in planned
        )  # fmt: skip
        how = "graph replays" if source == "counts_graph" else "same step run eagerly"
        lines.append(f"- profile of every planned step (decode, paged prefill), {how}: 0 DtoD + 1 prepare per step (dispatched) vs {LAYERS}/{LAYERS} (original): {'PASS' if ok else 'FAIL'}")
    lines.append(f"- outputs torch.equal across paths: {'PASS' if all(r.equal for r in results) else 'FAIL'}")
    return "\n".join(lines)


def _per_step(r: Result, source: str, path: str, kind: str) -> float:
    return getattr(r, source).get(path, {}).get(kind, 0.0)


if __name__ == "__main__":
    sys.exit(main())
