"""Host (CPU) time per call of varlen_diffusion's masked_attention, next to what it is made of and SDPA.

    python benchmarks/bench_varlen_host.py [--calls 200] [--rounds 7] [--out DIR] [--smoke]

Eager, no CUDA graph. Each round first puts a long ``torch.cuda._sleep`` on the stream, so the GPU is
busy while the timed loop enqueues ``--calls`` calls back to back: ``time.perf_counter`` around the loop
then measures only the host's work (Python, allocation, launch), at the real model shape, never GPU
time. ``torch.cuda.synchronize`` runs only between rounds. A round whose loop outlasted the sleep is
flagged ("gpu-bound?"): raise the sleep or lower ``--calls``. Medians over rounds, us per call. The rows
of one shape take turns round by round (order rotated), so the host's drift moves them alike.

Rows (Qwen-Image joint attention: B=1, 4096 image + 256 text tokens with 40 padded, 24 heads, d=128,
bf16; cross-attention: 4096 queries over 300 text keys with 100 padded, GQA 24/8 heads):

- ``sdpa``, ``sdpa+mask``: torch SDPA without a mask, and the original path (SDPA + boolean key mask);
- ``fa3 python entry``: ``vllm.vllm_flash_attn.flash_attn_varlen_func`` (when vllm is installed);
- ``fa3 raw op (bound)``: the provider's bound call (``FlashProvider.bind``), the floor for one FA call;
- ``gather: triton launcher`` / ``gather: bound launch`` / ``gather: index_select x2``: one K/V pack;
- ``masked_attention <strategy>``: the plugin's bound per-block path, per strategy;
- ``... (binding every call)``: the metadata's bound-call cache cleared before each call: the host cost
  of the unbound path (the layout work this change does once per metadata).

Without CUDA it runs a smoke test (tiny shapes, the CPU stand-in provider, Triton interpreted): the
script is checked, the numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the plugin's kernels import triton

import attn_dispatch_flash as flash_providers  # noqa: E402
from attn_dispatch import detect  # noqa: E402
from attn_dispatch.reference import masked as original  # noqa: E402
from attn_dispatch_flash.rows import gather_rows  # noqa: E402
from attn_dispatch_flash.rows_launch import bind_gather, index_select_gather  # noqa: E402
from attn_dispatch_varlen_diffusion.attention import build_ops  # noqa: E402

TESTS = Path(__file__).resolve().parents[1] / "plugins" / "varlen_diffusion" / "tests"
sys.path.insert(0, str(TESTS))
from varlen_masks import text_image_mask  # noqa: E402

SLEEP_CYCLES = int(4e8)  # ~0.2 s at the H200's ~1.98 GHz: longer than any timed loop here
TARGETS = {"kv_pack": 60.0, "zero_copy": 45.0}  # issue 11, us per call on the H200's host


def interleaved_host_us(fns: dict[str, Callable[[], object]], calls: int, rounds: int) -> dict[str, tuple[float, bool]]:
    """Per row: median host microseconds per call, and whether some round may have waited on the GPU.

    The rows take turns: each round times every row once (``calls`` calls after a fresh GPU sleep), in an
    order rotated round by round, so a drift in the host's speed (these hosts drift by tens of percent
    within a minute) moves every row alike instead of whichever row ran during it."""
    names = list(fns)
    for fn in fns.values():
        fn()  # warm: compile, bind, allocate
    times: dict[str, list[float]] = {name: [] for name in names}
    gpu_bound = dict.fromkeys(names, False)
    for round_ in range(rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            fn = fns[name]
            if CUDA:
                torch.cuda.synchronize()
                torch.cuda._sleep(SLEEP_CYCLES)
                slept = torch.cuda.Event()
                slept.record()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            elapsed = time.perf_counter() - start
            if CUDA:
                gpu_bound[name] |= slept.query()  # the GPU got through the sleep: the loop may have waited on it
                torch.cuda.synchronize()
            times[name].append(elapsed / calls * 1e6)
    return {name: (statistics.median(times[name]), gpu_bound[name]) for name in names}


def provider_here():
    if not CUDA:
        from varlen_torch_provider import make_torch_provider

        return make_torch_provider(), "cpu"
    provider, reason = flash_providers.probe(flash_providers.probe_order(detect(0).arch))
    if provider is None:
        sys.exit(f"no FlashAttention provider: {reason}")
    return provider, "cuda"


def fa3_python_entry(q, k, v, cu_q, cu_k, seqused_k, max_q, max_k, scale) -> Callable[[], object] | None:
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func
    except Exception:  # noqa: BLE001  (vllm absent or its FA3 not loadable)
        return None
    # The wrapper refuses cu_seqlens_k together with seqused_k (zero_copy's layout), so it is timed on the
    # padded layout (cu_seqlens_k = b * S_k): the same host work, another key range.
    cu_k_padded = torch.arange(cu_k.shape[0], dtype=torch.int32, device=q.device) * max_k
    return lambda: flash_attn_varlen_func(
        q, k, v, max_q, cu_q, max_k, cu_k_padded, softmax_scale=scale, causal=False, fa_version=3
    )


def rows_for(provider, device, *, batch, seqlen_q, key_mask, heads, kv_heads, head_dim, calls, rounds, label):
    """Timed rows for one shape: the pieces, then every strategy of the plugin."""
    seqlen_k = key_mask.shape[1]
    dt = torch.bfloat16
    q = torch.randn(batch, seqlen_q, heads, head_dim, device=device, dtype=dt)
    kv = torch.randn(batch, seqlen_k, 2, kv_heads, head_dim, device=device, dtype=dt)  # fused K/V projection
    k, v = kv.unbind(2)
    scale = head_dim**-0.5
    rows: list[dict] = []
    timed: dict[str, Callable[[], object]] = {}  # every row of this shape, timed together at the end

    def add(name: str, fn: Callable[[], object] | None) -> None:
        if fn is not None:
            timed[name] = fn

    ref_meta = original.build_mask_meta(key_mask)
    group = heads // kv_heads
    add("sdpa (no mask)", lambda: F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=group > 1))  # fmt: skip
    add("sdpa+mask (original path)", lambda: original.masked_attention(q, k, v, ref_meta))

    zc = build_ops(provider, general_strategy="kv_pack", device_type=device)
    meta = zc.build_mask_meta(key_mask)
    q_rows, k_rows, v_rows = (x.reshape(-1, *x.shape[2:]) for x in (q, k, v))
    cu_q = torch.arange(batch + 1, dtype=torch.int32, device=device) * seqlen_q
    static = dict(cu_seqlens_q=cu_q, cu_seqlens_k=meta.cu_seqlens_k, seqused_k=meta.seqlens, max_seqlen_q=seqlen_q,
                  max_seqlen_k=seqlen_k, softmax_scale=scale, causal=False)  # fmt: skip
    if CUDA and meta.strategy.value == "zero_copy":
        add("fa3 python entry (vllm flash_attn_varlen_func)", fa3_python_entry(
            q_rows, k_rows, v_rows, cu_q, meta.cu_seqlens_k, meta.seqlens, seqlen_q, seqlen_k, scale))  # fmt: skip
        bound = provider.bind(**static)
        out = torch.empty_like(q_rows)
        add("fa3 raw op (bound, into out)", lambda: bound(q_rows, k_rows, v_rows, out))

    indices = torch.nonzero(key_mask.reshape(-1)).squeeze(1).int()
    add("gather K,V: triton launcher", lambda: gather_rows((k, v), indices))
    bound_gather = bind_gather((k, v), indices)
    add("gather K,V: bound launch", lambda: bound_gather(k, v))
    add("gather K,V: index_select x2", index_select_gather((k, v), indices))

    variants = [("kv_pack", True, None), ("kv_pack", False, None), ("qkv_pack", False, False), ("qkv_pack", False, True)]
    seen = set()
    for general, zero_copy, pack_queries in variants:
        ops = build_ops(provider, general_strategy=general, zero_copy=zero_copy, device_type=device, pack_queries=pack_queries)
        meta = ops.build_mask_meta(key_mask)
        if not zero_copy and meta.strategy.value == "zero_copy":
            continue
        name = meta.strategy.value
        if general == "qkv_pack":
            name += " (Q packed)" if pack_queries and seqlen_q == seqlen_k else " (Q in place)"
        if name in seen:  # a general mask never runs zero-copy; cross-attention never packs Q
            continue
        seen.add(name)
        add(f"masked_attention {name}", lambda ops=ops, meta=meta: ops.masked_attention(q, k, v, meta))

        def unbound(ops=ops, meta=meta):
            meta.calls.clear()
            return ops.masked_attention(q, k, v, meta)

        add(f"masked_attention {name} (binding every call)", unbound)

    # K/V read in place as one-row pages instead of gathered (build_ops(key_pages=True)): host and GPU time.
    paths = {}
    for key_pages in (False, True):
        ops = build_ops(provider, general_strategy="kv_pack", zero_copy=False, device_type=device, key_pages=key_pages)
        meta = ops.build_mask_meta(key_mask)
        paths[key_pages] = lambda ops=ops, meta=meta: ops.masked_attention(q, k, v, meta)
    add("masked_attention kv_pack, K/V as pages", paths[True])
    for name, (us, gpu_bound) in interleaved_host_us(timed, calls, rounds).items():
        rows.append({"shape": label, "row": name, "host_us": us, "gpu_bound": gpu_bound})
        print(f"  {label:28s} {name:56s} {us:8.1f} us{'  (gpu-bound?)' if gpu_bound else ''}", flush=True)
    if CUDA:
        from triton.testing import do_bench

        gpu = {key_pages: do_bench(fn, warmup=25, rep=200) * 1e3 for key_pages, fn in paths.items()}
        equal = torch.equal(paths[False](), paths[True]())
        print(f"  {label:28s} GPU us per call: kv_pack gather {gpu[False]:.1f}, K/V as pages {gpu[True]:.1f}; equal={equal}", flush=True)
        rows.append({"shape": label, "row": "GPU us: kv_pack gather / K/V as pages", "host_us": gpu[False], "pages_gpu_us": gpu[True], "gpu_bound": False})
    return rows


def markdown(rows: list[dict], title: str) -> str:
    lines = [f"### Host time per call, eager: {title}", "", "| shape | call | host us | target |", "|---|---|---|---|"]
    for r in rows:
        strategy = next((s for s in TARGETS if r["row"] == f"masked_attention {s}"), None)
        target = f"<= {TARGETS[strategy]:.0f}: {'yes' if r['host_us'] <= TARGETS[strategy] else '**no**'}" if strategy else ""
        flag = " (gpu-bound?)" if r["gpu_bound"] else ""
        lines.append(f"| {r['shape']} | {r['row']} | {r['host_us']:.1f}{flag} | {target} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="calls per timed round (the GPU queue must hold them)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None, help="directory for JSON and markdown results")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (the default without CUDA)")
    args = parser.parse_args()
    smoke = args.smoke or not CUDA
    provider, device = provider_here()
    name = torch.cuda.get_device_name(0) if CUDA else "CPU (smoke run: timings mean nothing)"
    print(f"provider: {provider.describe()}; device: {name}; torch {torch.__version__}", flush=True)
    calls, rounds = (2, 1) if smoke else (args.calls, args.rounds)
    heads, head_dim, image, text, padded, cross_k = (4, 16, 12, 6, 2, 7) if smoke else (24, 128, 4096, 256, 40, 300)
    joint = dict(heads=heads, kv_heads=heads, head_dim=head_dim, calls=calls, rounds=rounds)
    rows = []
    for layout, text_first in (("prefix", False), ("general", True)):
        mask = text_image_mask([text - padded], text, image, text_first=text_first).to(device)
        rows += rows_for(provider, device, batch=1, seqlen_q=mask.shape[1], key_mask=mask, label=f"joint {layout}", **joint)
    text_mask = torch.zeros(1, cross_k, dtype=torch.bool, device=device)
    text_mask[:, : cross_k - cross_k // 3] = True  # right-padded text: zero-copy; kv_pack forced for the row below
    cross = dict(joint, kv_heads=heads // 3)
    rows += rows_for(provider, device, batch=1, seqlen_q=image, key_mask=text_mask, label="cross GQA prefix", **cross)
    title = f"{name}, {heads} heads, d={head_dim}, bf16, {provider.name}, {calls} calls x {rounds} rounds (medians)"
    table = markdown(rows, title)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_varlen_host.json").write_text(json.dumps({"rows": rows, "device": name}, indent=1))
        (args.out / "bench_varlen_host.md").write_text(table + "\n")
    print()
    print(table)


if __name__ == "__main__":
    main()
