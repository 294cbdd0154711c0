"""Masked diffusion attention: SDPA + boolean key mask vs the varlen_diffusion strategies, and the kernels.

    python benchmarks/bench_varlen_diffusion.py [--out DIR] [--smoke]

Qwen-Image joint attention: 24 heads, d=128, bf16, B in {1, 2}, 4096 or 16384 image tokens plus 256 or
512 text tokens of which a part is padding (row b keeps text - (b + 1) * text / 4). Two layouts of the
same tokens: image first (valid keys are a prefix: zero-copy) and text first (padding leaves a gap in
the middle: a general mask, packed). Times are medians of ``triton.testing.do_bench`` (L2 flushed before
each run), all taken in one process so the ratios compare like with like.

Bars (issue 4): >=1.5x over SDPA + mask for prefix layouts, >=1.4x for general masks, pack/scatter
<=8% of its strategy's time, kernels >=80% of the 4.25 TB/s copy ceiling (bytes read + written); the
kernel table also gives a torch copy of the same bytes, measured here, as the ceiling at that size.

Without CUDA it runs a smoke test (tiny shapes, the CPU stand-in provider from the plugin's tests,
Triton in the interpreter) so the script itself is checked; its timings mean nothing.
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

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the plugin's kernels import triton

import attn_dispatch_flash as flash_providers  # noqa: E402
from attn_dispatch import detect  # noqa: E402
from attn_dispatch.reference import masked as original  # noqa: E402
from attn_dispatch_flash.rows import gather_rows, scatter_rows  # noqa: E402
from attn_dispatch_varlen_diffusion.attention import build_ops  # noqa: E402
from attn_dispatch_varlen_diffusion.meta import Strategy  # noqa: E402

TESTS = Path(__file__).resolve().parents[1] / "plugins" / "varlen_diffusion" / "tests"
sys.path.insert(0, str(TESTS))
from varlen_masks import text_image_mask  # noqa: E402

COPY_CEILING = 4.25e12  # bytes/s read + written, device-to-device copy of 1 GiB on the H200
BARS = {"prefix": 1.5, "general": 1.4, "share": 0.08, "kernel": 0.80}


def bench(fn: Callable[[], object]) -> float:
    """Median microseconds."""
    if CUDA:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def provider_here():
    if not CUDA:
        from varlen_torch_provider import make_torch_provider

        return make_torch_provider(), "cpu"
    arch = detect(0).arch
    provider, reason = flash_providers.probe(flash_providers.probe_order(arch))
    if provider is None:
        sys.exit(f"no FlashAttention provider on {arch}: {reason}")
    return provider, "cuda"


def max_err_valid(out: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> float:
    valid = mask[:, :, None, None].expand_as(out)
    return (out.float() - ref.float()).abs()[valid].max().item()


def run_config(provider, device: str, batch: int, image: int, text: int, heads: int, head_dim: int) -> tuple[list, list]:
    """Strategy rows and kernel rows for one shape."""
    valid_text = [text - (b + 1) * text // 4 for b in range(batch)]
    seqlen = image + text
    q, k, v = (torch.randn(batch, seqlen, heads, head_dim, device=device, dtype=torch.bfloat16) for _ in range(3))
    variants = [(general, zero_copy, None) for general in ("kv_pack", "qkv_pack") for zero_copy in (True, False)]
    variants.append(("qkv_pack", False, True))  # the seed's form: Q packed whatever the cost model says
    ops = {
        (general, zero_copy, pack_queries): build_ops(
            provider, general_strategy=general, zero_copy=zero_copy, device_type=device, pack_queries=pack_queries
        )
        for general, zero_copy, pack_queries in variants
    }
    shape = f"{batch}, {image} + {text} ({'/'.join(map(str, valid_text))} valid)"
    sets = [(q, k, v)] + [tuple(torch.randn_like(x) for x in (q, k, v)) for _ in range(3 if CUDA else 0)]
    strategy_rows, kernel_rows = [], []
    for layout, text_first in (("prefix", False), ("general", True)):
        mask = text_image_mask(valid_text, text, image, text_first=text_first).to(device)
        ref_meta = original.build_mask_meta(mask)
        ref = original.masked_attention(q, k, v, ref_meta)
        runs = {"sdpa": lambda: original.masked_attention(q, k, v, ref_meta)}
        outputs, layout_rows = {}, []
        for (general, zero_copy, pack_queries), op in ops.items():
            if layout == "general" and zero_copy:
                continue  # a general mask never runs zero-copy: same rows as zero_copy=False
            meta = op.build_mask_meta(mask)
            label = meta.strategy.value + ("+seqused_q" if meta.strategy is Strategy.ZERO_COPY and meta.zero_masked_queries else "")
            if meta.strategy is Strategy.QKV_PACK:
                label += " (Q packed)" if meta.pack_queries else " (Q in place)"
            outputs[label] = op.masked_attention(q, k, v, meta)
            runs[label] = lambda op=op, meta=meta: op.masked_attention(q, k, v, meta)
            total_steady = steady_us([lambda s=s, op=op, meta=meta: op.masked_attention(*s, meta) for s in sets], repeats=8)
            moved = moved_steady_us(meta, sets, batch, seqlen)
            layout_rows.append({
                "shape": shape, "layout": layout, "strategy": label, "pack_us": moved, "steady_us": total_steady,
                "share": moved / total_steady, "max_err": max_err_valid(outputs[label], ref, mask),
            })  # fmt: skip
        times = time_interleaved(runs)
        for row in layout_rows:
            row.update(sdpa_us=times["sdpa"], us=times[row["strategy"]], speedup=times["sdpa"] / times[row["strategy"]])
            print(f"  {shape} {layout:7s} {row['strategy']:22s} {row['us']:9.1f} us  sdpa {row['sdpa_us']:9.1f} us  x{row['speedup']:.2f}  pack share {100 * row['share']:.1f}%", flush=True)
        if "zero_copy" in outputs:  # same kernel, same keys: must be bit-equal on valid rows
            valid = mask[:, :, None, None].expand_as(q)
            equal = torch.equal(outputs["zero_copy"][valid], outputs["kv_pack"][valid])
            for row in layout_rows:
                row["zero_copy_eq_kv_pack"] = equal
        strategy_rows += layout_rows
        if layout == "general":
            kernel_rows += kernel_measurements(q, k, v, ops["kv_pack", False, None].build_mask_meta(mask), ops["qkv_pack", False, True].build_mask_meta(mask))
    return strategy_rows, kernel_rows


def run_cross(provider, device: str, smoke: bool) -> list[dict]:
    """Cross-attention rows: image queries over padded text keys (Sana / PixArt-Sigma style), SDPA + mask
    against the plugin, with and without GQA; prefix (right-padded text: zero-copy) and gapped keys (kv_pack)."""
    heads, head_dim, image, text = (2, 16, 24, 9) if smoke else (24, 128, 4096, 300)
    rows = []
    for batch in (1, 2):
        valid = [text - (b + 1) * text // 3 for b in range(batch)]
        for kv_heads in (heads, heads // 2 if smoke else 8):
            q = torch.randn(batch, image, heads, head_dim, device=device, dtype=torch.bfloat16)
            k, v = torch.randn(batch, text, 2, kv_heads, head_dim, device=device, dtype=torch.bfloat16).unbind(2)
            prefix = torch.tensor([[s < n for s in range(text)] for n in valid], device=device)
            gaps = prefix.clone()
            gaps[:, 1] = False  # a hole: general layout
            for layout, mask in (("prefix", prefix), ("general", gaps)):
                ops = build_ops(provider, general_strategy="kv_pack", device_type=device)
                meta = ops.build_mask_meta(mask)
                ref_meta = original.build_mask_meta(mask)
                ref = original.masked_attention(q, k, v, ref_meta)
                out = ops.masked_attention(q, k, v, meta)
                times = time_interleaved({
                    "sdpa": lambda: original.masked_attention(q, k, v, ref_meta),
                    "ours": lambda: ops.masked_attention(q, k, v, meta),
                })  # fmt: skip
                err = (out.float() - ref.float()).abs()[mask.any(1)].max().item()
                rows.append({
                    "shape": f"{batch}, {image} q over {text} k ({'/'.join(map(str, valid))} valid)", "heads": f"{heads}/{kv_heads}",
                    "layout": layout, "strategy": meta.strategy.value, "sdpa_us": times["sdpa"], "us": times["ours"],
                    "speedup": times["sdpa"] / times["ours"], "max_err": err,
                })  # fmt: skip
                r = rows[-1]
                print(f"  cross {r['shape']} H {r['heads']} {layout:7s} {r['strategy']:9s} {r['us']:8.1f} us  sdpa {r['sdpa_us']:8.1f} us  x{r['speedup']:.2f}  err {err:.1e}", flush=True)
    return rows


def cross_markdown(rows: list[dict]) -> str:
    lines = ["", "### Cross-attention (image queries over padded text keys; H q/kv heads)", ""]
    lines += ["| B, S_q over S_k | heads q/kv | layout | strategy | SDPA + mask us | ours us | speedup | max err |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['heads']} | {r['layout']} | {r['strategy']} | {r['sdpa_us']:.1f} | {r['us']:.1f} | {r['speedup']:.2f}x | {r['max_err']:.2e} |")
    return "\n".join(lines)


def steady_us(calls: list[Callable[[], object]], repeats: int = 20) -> float:
    """Median microseconds per call in steady state: a CUDA graph of back-to-back calls cycling through
    ``calls`` (the same kernel on distinct input sets, so no call finds its inputs in L2), as the kernels
    run inside a model: each call pays for the L2 write-backs the previous one left. (``bench``'s do_bench
    flushes L2 by writing 256 MB before each call instead, so a small kernel also pays for up to a whole L2
    of someone else's dirty lines: the "cold" columns.)"""
    if not CUDA:
        return bench(calls[0])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    rounds = max(1, repeats // len(calls))
    with torch.cuda.graph(graph):
        for _ in range(rounds):
            for call in calls:
                call()
    samples = []
    for _ in range(15):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / (rounds * len(calls)))
    return statistics.median(samples)


def time_interleaved(runs: dict[str, Callable[[], object]], rounds: int = 3) -> dict[str, float]:
    """Median over rounds of each run's :func:`bench`, the order rotating every round, so clock and power
    drift across a long run hit every strategy alike."""
    names = list(runs)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds if CUDA else 1):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            samples[name].append(bench(runs[name]))
    return {name: statistics.median(times) for name, times in samples.items()}


def moved_steady_us(meta, sets, batch: int, seqlen: int) -> float:
    """Steady-state time of a strategy's data movement: the pack (and scatter, or the zeroing of masked
    rows), over the same input sets as the strategy's own steady time."""
    if meta.pack_queries:
        packs = [gather_rows((s[0],), meta.indices)[0] for s in sets]
        return steady_us([lambda s=s: gather_rows(s, meta.indices) for s in sets]) + steady_us(
            [lambda p=p: scatter_rows(p, meta.inverse, batch, seqlen) for p in packs]
        )
    if meta.strategy is Strategy.ZERO_COPY:
        return 0.0
    moved = steady_us([lambda s=s: gather_rows(s[1:], meta.indices) for s in sets])
    if meta.masked is not None:  # qkv_pack with Q in place: the masked rows of the output zeroed
        outs = [torch.empty_like(s[0]).view(batch * seqlen, -1) for s in sets]
        moved += steady_us([lambda o=o: o.index_fill_(0, meta.masked, 0) for o in outs])
    return moved


def kernel_measurements(q, k, v, kv_meta, qkv_meta, input_sets: int = 4) -> list[dict]:
    """The pack and scatter kernels against torch's index ops and a plain copy of the same bytes, each
    timed in steady state (:func:`steady_us`, the bar's measure) and cold (:func:`bench`)."""
    batch, seqlen, heads, head_dim = q.shape
    features = heads * head_dim
    n, rows = qkv_meta.total, batch * seqlen
    n_kv = kv_meta.indices.numel()  # kv_pack gathers every row, the valid ones first
    size = q.element_size()
    idx_long, kv_long = qkv_meta.indices.long(), kv_meta.indices.long()
    extra = input_sets - 1 if CUDA else 0
    sets = [(q, k, v)] + [tuple(torch.randn_like(x) for x in (q, k, v)) for _ in range(extra)]
    packs = [gather_rows((s[0],), qkv_meta.indices)[0] for s in sets]
    flat = [x.view(rows, heads, head_dim) for x in (q, k, v)]
    cases = [
        ("pack K,V", 2 * 2 * n_kv * features * size + 4 * n_kv, [lambda s=s: gather_rows(s[1:], kv_meta.indices) for s in sets],
         lambda: [x.index_select(0, kv_long) for x in flat[1:]]),
        ("pack Q,K,V", 3 * 2 * n * features * size + 4 * n, [lambda s=s: gather_rows(s, qkv_meta.indices) for s in sets],
         lambda: [x.index_select(0, idx_long) for x in flat]),
        ("scatter", (n + rows) * features * size + 4 * rows,
         [lambda p=p: scatter_rows(p, qkv_meta.inverse, batch, seqlen) for p in packs],
         lambda: torch.zeros_like(flat[0]).index_copy_(0, idx_long, packs[0])),
    ]  # fmt: skip
    results = []
    for name, nbytes, kernels, torch_version in cases:
        payload = nbytes - 4 * {"scatter": rows, "pack K,V": n_kv}.get(name, n)  # the rows moved, without the int32 map
        sources = [torch.empty(payload // 2, dtype=torch.uint8, device=q.device) for _ in sets]
        copies = [lambda src=src, dst=torch.empty_like(src): dst.copy_(src) for src in sources]
        kernel_us, copy_us = steady_us(kernels), steady_us(copies)
        cold_us, cold_copy_us, torch_us = bench(kernels[0]), bench(copies[0]), bench(torch_version)
        results.append({
            "kernel": name, "rows": f"{n} of {rows}", "features": features, "mb": nbytes / 1e6, "us": kernel_us,
            "gbps": nbytes / kernel_us / 1e3, "of_ceiling": nbytes / kernel_us / 1e-6 / COPY_CEILING,
            "of_copy": copy_us / kernel_us, "copy_us": copy_us, "cold_us": cold_us,
            "cold_of_ceiling": nbytes / cold_us / 1e-6 / COPY_CEILING, "cold_of_copy": cold_copy_us / cold_us,
            "torch_us": torch_us,
        })  # fmt: skip
        print(f"  {name:11s} {n:6d} rows {kernel_us:8.1f} us {results[-1]['gbps']:7.0f} GB/s (cold {cold_us:.1f} us)  torch {torch_us:8.1f} us", flush=True)
    return results


def markdown(strategy_rows: list[dict], kernel_rows: list[dict], title: str) -> str:
    def ok(good: bool) -> str:
        return "yes" if good else "**no**"

    lines = [f"### Masked joint attention on {title}", ""]
    lines += ["Times: do_bench medians (L2 flushed), 3 interleaved rounds. Pack/scatter share: the strategy's data "
              "movement over its own time, both in steady state (back-to-back calls over 4 input sets).", ""]  # fmt: skip
    lines += ["| B, image + text | layout | strategy | SDPA + mask | ours | speedup (bar) | pack/scatter steady us (share <= 8%) | max err valid rows | zc == kv_pack |"]
    lines += ["|---|---|---|---|---|---|---|---|---|"]
    for r in strategy_rows:
        bar = BARS[r["layout"]]
        share = f"{r['pack_us']:.1f} ({100 * r['share']:.1f}%, {ok(r['share'] <= BARS['share'])})" if r["pack_us"] else "-"
        eq = {True: "equal", False: "**differ**"}.get(r.get("zero_copy_eq_kv_pack"), "-")
        lines.append(
            f"| {r['shape']} | {r['layout']} | {r['strategy']} | {r['sdpa_us']:.1f} | {r['us']:.1f} | "
            f"{r['speedup']:.2f}x (>= {bar}: {ok(r['speedup'] >= bar)}) | {share} | {r['max_err']:.2e} | {eq} |"
        )
    lines += ["", "### Pack / scatter kernels (bytes read + written; ceiling 4.25 TB/s)", ""]
    lines += ["Steady: back-to-back calls in a CUDA graph over 4 input sets, as in a model (the bar's measure). "
              "Cold: do_bench, which writes 256 MB before each call to flush L2.", ""]  # fmt: skip
    lines += ["| kernel | rows | features | MB | steady us | GB/s | of 4.25 TB/s (>= 80%) | vs torch copy of same bytes | cold us | cold: of 4.25 TB/s | cold: vs torch copy | torch index ops us (cold) |"]
    lines += ["|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in kernel_rows:
        lines.append(
            f"| {r['kernel']} | {r['rows']} | {r['features']} | {r['mb']:.1f} | {r['us']:.1f} | {r['gbps']:.0f} | "
            f"{100 * r['of_ceiling']:.0f}% ({ok(r['of_ceiling'] >= BARS['kernel'])}) | {100 * r['of_copy']:.0f}% | "
            f"{r['cold_us']:.1f} | {100 * r['cold_of_ceiling']:.0f}% | {100 * r['cold_of_copy']:.0f}% | {r['torch_us']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="directory for the JSON results and the table")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (the default without CUDA)")
    args = parser.parse_args()
    smoke = args.smoke or not CUDA
    provider, device = provider_here()
    device_name = torch.cuda.get_device_name(0) if CUDA else "CPU (smoke run: timings mean nothing)"
    print(f"provider: {provider.describe()}; device: {device_name}; torch {torch.__version__}", flush=True)
    torch.manual_seed(0)
    heads, head_dim = (2, 16) if smoke else (24, 128)
    images, texts = ((24,), (8,)) if smoke else ((4096, 16384), (256, 512))
    strategy_rows, kernel_rows = [], []
    for image in images:
        for text in texts:
            for batch in (1, 2):
                s_rows, k_rows = run_config(provider, device, batch, image, text, heads, head_dim)
                strategy_rows += s_rows
                kernel_rows += k_rows
                if CUDA:
                    torch.cuda.empty_cache()
    cross_rows = run_cross(provider, device, smoke)
    title = f"{device_name} ({heads} heads, d={head_dim}, bf16; {provider.name}; medians, us)"
    table = markdown(strategy_rows, kernel_rows, title) + "\n" + cross_markdown(cross_rows)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        results = {"strategies": strategy_rows, "kernels": kernel_rows, "cross": cross_rows, "device": device_name}
        (args.out / "bench_varlen_diffusion.json").write_text(json.dumps(results, indent=1))
        (args.out / "bench_varlen_diffusion.md").write_text(table + "\n")
    print()
    print(table)


if __name__ == "__main__":
    main()
