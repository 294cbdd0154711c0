"""Host time of a transformers decode step's per-step work, piece by piece, without a profiler's inflation.

    python benchmarks/diag_plan_host.py [--calls 100] [--rounds 7]

A decode step of the transformers integration makes, per op group: the one-row page table (one bound
Triton launch), a paged plan (validation, FA3's scheduler metadata), and ``bind_attention``'s run; each
layer then calls the run. This times each piece alone (GPU kept busy by ``torch.cuda._sleep``, so only
host work is timed; the pieces take turns, medians over rounds, us per call) at a Llama-3.2-1B-like and a Gemma-2-2B-like decode
shape (8 rows, about 2k keys), next to FA3's forward with and without the metadata handed in, which is
what making it once per step saves in every layer. Needs CUDA and an FA3 provider.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_varlen_host import interleaved_host_us  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return
    import attn_dispatch
    from attn_dispatch.integrations import transformers_decode as decode
    from attn_dispatch.plans import AttentionParams
    from attn_dispatch_cuda_fa3.plan import paged_args
    from attn_dispatch_flash import pages

    ops = attn_dispatch.load(torch.device("cuda"))
    implementation = getattr(ops.make_attention_plan, "__self__", None)
    provider = getattr(implementation, "provider", None)
    if provider is None:
        sys.exit(f"make_attention_plan is not cuda_fa3's here: {ops.make_attention_plan}")
    print(f"provider: {provider.describe()}; {torch.cuda.get_device_name(0)}", flush=True)
    dev, batch, length = torch.device("cuda", 0), 8, 2176
    padding = torch.ones(batch, length + 64, dtype=torch.bool, device=dev)
    for b in range(batch):
        padding[b, : 200 * b] = False  # left padding, as generate's
    for label, heads, kv_heads, head_dim, softcap in (("llama-like", 32, 8, 64, 0.0), ("gemma2-like", 8, 4, 256, 50.0)):
        params = AttentionParams(causal=True, softcap=softcap)
        table, counts = pages.one_query_pages(
            padding, batch=batch, length=length, key_offset=0, query=length - 1, window=None,
            page_step=kv_heads * length, device=dev,
        )  # fmt: skip
        cu_q = torch.arange(batch + 1, dtype=torch.int32, device=dev)
        plan_kwargs = dict(
            cache_seqlens=counts, page_table=table, page_size=1, cu_seqlens_q=cu_q, max_seqlen_q=1, max_seqlen_k=length,
            num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, dtype=torch.bfloat16, layer_params=(params,),
        )  # fmt: skip
        plan = ops.make_attention_plan(**plan_kwargs)
        cache = torch.randn(batch, kv_heads, length, head_dim, device=dev, dtype=torch.bfloat16)
        k_pages = decode.paged_keys(cache)  # the integration's own view of the cache as one-row pages
        q = torch.randn(batch, heads, head_dim, device=dev, dtype=torch.bfloat16)
        out = torch.empty_like(q)
        run = ops.bind_attention(plan, params=params)
        with_metadata = provider.bind(paged_args(plan, params, None, provider.name))
        without = provider.bind(paged_args(plan, params, None, provider.name)._replace(scheduler_metadata=None))
        with_metadata(q, k_pages, k_pages, out)
        reference = out.clone()
        without(q, k_pages, k_pages, out)
        equal = torch.equal(out, reference)
        rows = {
            "page table (one bound Triton launch)": lambda: pages.one_query_pages(
                padding, batch=batch, length=length, key_offset=0, query=length - 1, window=None,
                page_step=kv_heads * length, device=dev,
            ),  # fmt: skip
            "FA3 scheduler metadata (provider call)": lambda: provider.scheduler_metadata(
                batch_size=batch, max_seqlen_q=1, max_seqlen_k=length, num_heads=heads, num_kv_heads=kv_heads,
                head_dim=head_dim, head_dim_v=head_dim, cache_seqlens=counts, cu_seqlens_q=cu_q, page_size=1,
                dtype=torch.bfloat16, causal=True, window_size=(-1, -1), softcap=softcap, num_splits=0, pack_gqa=None,
            ),  # fmt: skip
            "make_attention_plan (validation + metadata)": lambda: ops.make_attention_plan(**plan_kwargs),
            "bind_attention (a new plan's run)": lambda: ops.bind_attention(ops.make_attention_plan(**plan_kwargs), params=params),
            "layer: bind_attention run": lambda: run(q, k_pages, k_pages, out),
            "layer: FA3 raw op, laid out, with metadata": lambda: with_metadata(q, k_pages, k_pages, out),
            "layer: FA3 raw op, laid out, no metadata": lambda: without(q, k_pages, k_pages, out),
        }
        print(f"\n## {label}: B={batch}, {heads}/{kv_heads} heads of {head_dim}, {length} keys, one-row pages "
              f"(bytes with and without metadata equal: {equal})")  # fmt: skip
        print("| piece (host us per call, GPU kept busy; rows in turns) | us |\n|---|---|")
        for name, (us, gpu_bound) in interleaved_host_us(rows, args.calls, args.rounds).items():
            print(f"| {name} | {us:.1f}{' (gpu-bound?)' if gpu_bound else ''} |", flush=True)


if __name__ == "__main__":
    main()
