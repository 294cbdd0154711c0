"""The conformance grid (plugins/cuda_fa3/tests/conformance_grid.py) outside pytest, as one markdown table.

    python3 benchmarks/conformance_report.py [--full] [--family NAME] [--unguarded]

One row per failing run (configuration, op, schedule): our max/mean error against the fp32 torch reference,
the provider's own Python API on the same paged inputs where it can be called
(``vllm.vllm_flash_attn.flash_attn_varlen_func`` with ``block_table``; its wrapper takes no ``pack_gqa``, so
that run lets the kernel choose; a padded run: ``flash_attn_with_kvcache`` with ``cache_seqlens`` and
``cache_leftpad``, where the installed wrapper takes them), and the low-precision reference's own error
(the yardstick: ours may be at most 2x its max + 1e-5 and 1.5x its mean). Then a summary count per family
and op. Progress goes to stderr. The default seeded sample finishes in a few minutes on one H200; ``--full``
runs every configuration. ``--unguarded`` empties cuda_fa3's known-wrong table first: the "before" of the
guard, every layer on the kernel. Without a CUDA device it says so and exits 0.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "cuda_fa3" / "tests"))


def provider_api():
    """vllm's public FA3 varlen function and the keywords it takes, or (None, why)."""
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func
    except Exception as exc:  # not installed, or installed without its FA3 extension
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0]
    return flash_attn_varlen_func, set(inspect.signature(flash_attn_varlen_func).parameters)


def provider_kvcache_api():
    """vllm's public FA3 ``flash_attn_with_kvcache`` and its keywords (a padded case's batch mode), or (None, why)."""
    try:
        from vllm.vllm_flash_attn import flash_attn_with_kvcache
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0]
    keywords = set(inspect.signature(flash_attn_with_kvcache).parameters)
    return (flash_attn_with_kvcache, keywords) if "cache_leftpad" in keywords else (None, "no cache_leftpad keyword")


def provider_error(fn, keywords, grid, case, batch, params, exact) -> str:
    """max/mean error of the provider's own API on ``batch``'s paged (or padded) inputs, as a table cell."""
    if fn is None:
        return "n/a"
    extra = {"num_splits": params.num_splits, "fa_version": 3}
    if params.pack_gqa is not None and "pack_gqa" in keywords:
        extra["pack_gqa"] = params.pack_gqa
    a = batch.plan_args
    if case.padded:  # FA3's batch mode over the contiguous caches, each row's keys [cache_leftpad, cache_seqlens)
        try:
            out = fn(
                batch.q, batch.k_cache, batch.v_cache, cache_seqlens=a["cache_seqlens"], cache_leftpad=a["key_starts"],
                softmax_scale=case.head_dim**-0.5, causal=params.causal, window_size=list(params.window_size),
                softcap=params.softcap, **{k: v for k, v in extra.items() if k in keywords},
            )  # fmt: skip
        except Exception as exc:
            return f"raised {type(exc).__name__}"
        max_err, mean_err = grid.error(out.flatten(0, 1), exact)
        return f"{max_err:.3g} / {mean_err:.3g}"
    try:
        out = fn(
            batch.q, batch.k_cache, batch.v_cache, a["max_seqlen_q"], a["cu_seqlens_q"], a["max_seqlen_k"],
            seqused_k=a["cache_seqlens"], softmax_scale=case.head_dim**-0.5, causal=params.causal,
            window_size=list(params.window_size), softcap=params.softcap, block_table=a["page_table"],
            **{k: v for k, v in extra.items() if k in keywords},
        )  # fmt: skip
    except Exception as exc:
        return f"raised {type(exc).__name__}"
    max_err, mean_err = grid.error(out, exact)
    return f"{max_err:.3g} / {mean_err:.3g}"


def report(grid, ops, chosen, device, fn, keywords, kvcache=(None, "")) -> tuple[list[str], list[str]]:
    """Run ``chosen`` through ``ops``: (markdown rows of failing runs, summary lines); progress to stderr.
    ``fn, keywords``: :func:`provider_api`'s (paged runs); ``kvcache``: :func:`provider_kvcache_api`'s (padded runs)."""
    rows, runs, failed_runs, failed_cases = [], Counter(), Counter(), Counter()
    start = time.perf_counter()
    with torch.inference_mode():
        for i, case in enumerate(chosen, 1):
            batch = grid.make_batch(case, device)
            outcomes = grid.run_case(ops, case, device, batch=batch)
            bad = [o for o in outcomes if not o.ok]
            for o in outcomes:
                runs[(case.family, o.op)] += 1
            for o in bad:
                failed_runs[(case.family, o.op)] += 1
                exact = grid.reference(case, batch, o.params, upcast=True)
                if o.op == "paged":
                    api = provider_error(fn, keywords, grid, case, batch, o.params, exact)
                elif o.op == "padded":
                    api = provider_error(*kvcache, grid, case, batch, o.params, exact)
                else:
                    api = "-"
                ours = o.error or f"{o.max_err:.3g} / {o.mean_err:.3g}{'' if o.reuse_equal else ' (reuse differs)'}"
                rows.append(f"| {case.describe(o.params)} | {o.op} | {ours} | {api} | {o.ref_max_err:.3g} / {o.ref_mean_err:.3g} |")
            failed_cases[case.family] += bool(bad)
            if i % 25 == 0 or i == len(chosen):
                print(f"[{time.perf_counter() - start:6.1f}s] {i}/{len(chosen)} configurations, {len(rows)} failing runs", file=sys.stderr)
            del batch
    summary = []
    for family, count in Counter(c.family for c in chosen).items():
        summary.append(f"- {family}: {failed_cases[family]}/{count} configurations failing")
    for (family, op), count in sorted(runs.items()):
        summary.append(f"  - {family} {op}: {failed_runs[(family, op)]}/{count} runs failing")
    summary.append(f"- {sum(failed_cases.values())}/{len(chosen)} configurations failing in {time.perf_counter() - start:.0f}s")
    return rows, summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="every configuration, not the seeded sample")
    parser.add_argument(
        "--family", choices=("vllm-decode", "vllm-varlen", "fa3-kvcache", "fa3-kvcache-padded", "window-sweep"), default=None
    )
    parser.add_argument("--unguarded", action="store_true", help="empty the known-wrong table: every layer on the kernel")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("conformance_report: no CUDA device here; run it on an sm90 GPU with an FA3 provider (nothing to do).")
        return 0
    if args.full:
        os.environ["ATTN_DISPATCH_CONFORMANCE"] = "full"
    import attn_dispatch
    import conformance_grid as grid
    from attn_dispatch_cuda_fa3 import known_wrong, stats

    if args.unguarded:
        known_wrong.TABLE = ()

    ops = attn_dispatch.load("cuda")
    print(ops.summary(), file=sys.stderr)
    for op in ("make_attention_plan", "paged_attention_out", "varlen_attention_out", "bind_attention"):
        if ops.resolutions[op].plugin != "cuda_fa3":
            print(f"conformance_report: {op} resolved to {ops.resolutions[op].plugin}, not cuda_fa3; nothing to check.")
            return 0
    fn, keywords = provider_api()
    if fn is None:
        print(f"provider API column: n/a ({keywords})", file=sys.stderr)
    kvcache = provider_kvcache_api()
    if kvcache[0] is None:
        print(f"provider API column, padded runs: n/a ({kvcache[1]})", file=sys.stderr)

    chosen = grid.cases(args.family)
    rows, summary = report(grid, ops, chosen, "cuda", fn, keywords, kvcache)
    print("\n| configuration | op | ours max / mean | provider API max / mean | low-precision ref max / mean |")
    print("|---|---|---|---|---|")
    print("\n".join(rows) if rows else "| (none failing) | | | | |")
    print("\nSummary:")
    print("\n".join(summary))
    table = "emptied (--unguarded)" if args.unguarded else f"{len(known_wrong.TABLE)} classes"
    print(f"- known-wrong table {table}; layer calls bound to the dense route: {stats.guarded_bindings}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
