"""Does handing FA3 its scheduler metadata (made once) save host or GPU time per call? Paired A/B.

    python benchmarks/diag_fa3_metadata.py [--rounds 40] [--pairs 40]

For each call kind, A is the call with FA3's scheduler metadata made once beforehand, B the same call
with FA3 scheduling itself (its ``prepare_varlen_num_blocks`` launch inside every call). Host: per round
the GPU is put to sleep (so no launch waits on it), then A and B alternate call by call (which goes first
swaps each round), each call timed alone; the median of the per-pair differences A - B cancels the host's
drift. GPU: ``triton.testing.do_bench`` medians of A and B, alternated over rounds. Bytes compared.

Kinds: FA3's raw op (vllm's, laid out once) for the Qwen-Image joint shape read in place (zero-copy:
``cu_seqlens_k`` + ``seqused_k``), the same keys packed (``cu_seqlens_k`` only), cross-attention with GQA,
and a decode step's one-row pages; then varlen_diffusion's ``masked_attention`` (zero_copy, kv_pack)
with and without the metadata, as the plugin binds it.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def paired_host_us(a, b, rounds: int, pairs: int) -> tuple[float, float, float]:
    """(median A, median B, median of A - B), us per call."""
    a(), b()
    times_a, times_b, diffs = [], [], []
    clock = time.perf_counter_ns
    for round_ in range(rounds):
        torch.cuda.synchronize()
        torch.cuda._sleep(int(2e8))
        first, second = (a, b) if round_ % 2 == 0 else (b, a)
        for _ in range(pairs):
            t0 = clock()
            first()
            t1 = clock()
            second()
            t2 = clock()
            ta, tb = (t1 - t0, t2 - t1) if first is a else (t2 - t1, t1 - t0)
            times_a.append(ta), times_b.append(tb), diffs.append(ta - tb)
        torch.cuda.synchronize()
    return statistics.median(times_a) / 1e3, statistics.median(times_b) / 1e3, statistics.median(diffs) / 1e3


def gpu_us(a, b, rounds: int = 5) -> tuple[float, float]:
    from triton.testing import do_bench

    samples = {"a": [], "b": []}
    for _ in range(rounds):
        for name, fn in (("a", a), ("b", b)):
            samples[name].append(do_bench(fn, warmup=10, rep=50) * 1e3)
    return statistics.median(samples["a"]), statistics.median(samples["b"])


def report(label: str, a, b, args, outputs=None) -> None:
    ma, mb, diff = paired_host_us(a, b, args.rounds, args.pairs)
    ga, gb = gpu_us(a, b)
    equal = "" if outputs is None else f"; bytes equal: {torch.equal(*outputs())}"
    print(f"| {label} | {ma:.1f} | {mb:.1f} | **{diff:+.1f}** | {ga:.1f} | {gb:.1f}{equal} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--pairs", type=int, default=40)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return
    import attn_dispatch_flash as flash_providers
    from attn_dispatch import detect
    from attn_dispatch.integrations import transformers_decode as decode
    from attn_dispatch_varlen_diffusion.attention import build_ops

    import bench_varlen_host  # noqa: F401  (puts the varlen tests' helpers on sys.path)

    provider, reason = flash_providers.probe(flash_providers.probe_order(detect(0).arch))
    if provider is None or not provider.takes_metadata(packed=True):
        sys.exit(f"needs an FA3 provider whose varlen call takes scheduler metadata: {provider} {reason}")
    unscheduled = dataclasses.replace(provider, scheduler_metadata=None)
    print(f"provider: {provider.describe()}; {torch.cuda.get_device_name(0)}")
    dev, dt = torch.device("cuda", 0), torch.bfloat16
    print("\n| call (A: metadata made once; B: FA3 schedules each call) | host A us | host B us | median A - B | GPU A us | GPU B us |")
    print("|---|---|---|---|---|---|")

    def metadata(batch, max_q, max_k, heads, kv_heads, d, seqlens, cu_q, page_size=None, causal=False):
        return provider.scheduler_metadata(
            batch_size=batch, max_seqlen_q=max_q, max_seqlen_k=max_k, num_heads=heads, num_kv_heads=kv_heads,
            head_dim=d, head_dim_v=d, cache_seqlens=seqlens, cu_seqlens_q=cu_q, page_size=page_size, dtype=dt,
            causal=causal, window_size=(-1, -1), softcap=0.0, num_splits=0, pack_gqa=None,
        )  # fmt: skip

    # Qwen-Image joint attention, B=1: 4096 image + 256 text tokens (40 padded), 24 heads of 128
    heads, d, seqlen = 24, 128, 4352
    q = torch.randn(seqlen, heads, d, device=dev, dtype=dt)
    k, v = torch.randn_like(q), torch.randn_like(q)
    out = torch.empty_like(q)
    valid = seqlen - 40
    cu_q = torch.tensor([0, seqlen], dtype=torch.int32, device=dev)
    seqlens = torch.tensor([valid], dtype=torch.int32, device=dev)
    cu_k_packed = torch.tensor([0, valid], dtype=torch.int32, device=dev)
    for label, fields in (
        ("raw op, joint, keys read in place (seqused_k)", dict(cu_seqlens_k=cu_q, seqused_k=seqlens)),
        ("raw op, joint, keys packed", dict(cu_seqlens_k=cu_k_packed)),
    ):
        common = dict(cu_seqlens_q=cu_q, max_seqlen_q=seqlen, max_seqlen_k=seqlen, softmax_scale=d**-0.5, causal=False, **fields)
        with_md = provider.bind(**common, scheduler_metadata=metadata(1, seqlen, seqlen, heads, heads, d, seqlens, cu_q))
        without = provider.bind(**common)
        out_b = torch.empty_like(out)
        report(label, lambda: with_md(q, k, v, out), lambda: without(q, k, v, out), args,
               lambda: (with_md(q, k, v, out), without(q, k, v, out_b)))  # fmt: skip

    # cross-attention with GQA: 4096 image queries over 300 text keys (100 padded), 24/8 heads
    qc = torch.randn(4096, heads, d, device=dev, dtype=dt)
    kc, vc = (torch.randn(300, 8, d, device=dev, dtype=dt) for _ in range(2))
    outc, outc_b = torch.empty_like(qc), torch.empty_like(qc)
    cu_qc = torch.tensor([0, 4096], dtype=torch.int32, device=dev)
    cu_kc = torch.tensor([0, 300], dtype=torch.int32, device=dev)
    used = torch.tensor([200], dtype=torch.int32, device=dev)
    common = dict(cu_seqlens_q=cu_qc, cu_seqlens_k=cu_kc, seqused_k=used, max_seqlen_q=4096, max_seqlen_k=300, softmax_scale=d**-0.5, causal=False)
    with_md = provider.bind(**common, scheduler_metadata=metadata(1, 4096, 300, heads, 8, d, used, cu_qc))
    without = provider.bind(**common)
    report("raw op, cross GQA, keys read in place", lambda: with_md(qc, kc, vc, outc), lambda: without(qc, kc, vc, outc), args,
           lambda: (with_md(qc, kc, vc, outc), without(qc, kc, vc, outc_b)))  # fmt: skip

    # a decode step's layer: 8 rows, one query each, ~2k keys as one-row pages, 32/8 heads of 64
    batch, length, hq, hk, dd = 8, 2176, 32, 8, 64
    cache = torch.randn(batch, hk, length, dd, device=dev, dtype=dt)
    k_pages = decode.paged_keys(cache)  # the transformers integration's one-row pages over the cache
    table = decode.page_table(torch.arange(length, dtype=torch.int32, device=dev).expand(batch, length), hk, length)
    counts = torch.full((batch,), length, dtype=torch.int32, device=dev)
    cu_1 = torch.arange(batch + 1, dtype=torch.int32, device=dev)
    qd = torch.randn(batch, hq, dd, device=dev, dtype=dt)
    outd, outd_b = torch.empty_like(qd), torch.empty_like(qd)
    common = dict(cu_seqlens_q=cu_1, seqused_k=counts, page_table=table, max_seqlen_q=1, max_seqlen_k=length, softmax_scale=dd**-0.5, causal=True)
    with_md = provider.bind(**common, scheduler_metadata=metadata(batch, 1, length, hq, hk, dd, counts, cu_1, page_size=1, causal=True))
    without = provider.bind(**common)
    report("raw op, decode, one-row pages", lambda: with_md(qd, k_pages, k_pages, outd), lambda: without(qd, k_pages, k_pages, outd), args,
           lambda: (with_md(qd, k_pages, k_pages, outd), without(qd, k_pages, k_pages, outd_b)))  # fmt: skip

    # the plugin's per-block call, as bound with and without the metadata
    from varlen_masks import text_image_mask

    q4, k4, v4 = (torch.randn(1, seqlen, heads, d, device=dev, dtype=dt) for _ in range(3))
    for layout, text_first in (("zero_copy", False), ("kv_pack", True)):
        mask = text_image_mask([216], 256, 4096, text_first=text_first).to(dev)
        calls = []
        for p in (provider, unscheduled):
            ops = build_ops(p, general_strategy="kv_pack", device_type="cuda")
            meta = ops.build_mask_meta(mask)
            assert meta.strategy.value == layout, meta.strategy
            calls.append(lambda ops=ops, meta=meta: ops.masked_attention(q4, k4, v4, meta))
        report(f"masked_attention {layout}, Qwen-Image joint", *calls, args, lambda: (calls[0](), calls[1]()))


if __name__ == "__main__":
    main()
