"""Narrow down the FA3 configurations the conformance grid finds wrong (issue 12): one failing case, varied
one axis at a time (schedule, heads, head dim, window, sequence), with the max error per sequence.

    python3 benchmarks/diag_fa3_window.py
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "cuda_fa3" / "tests"))
import conformance_grid as cg  # noqa: E402

import attn_dispatch  # noqa: E402
from attn_dispatch import AttentionParams  # noqa: E402

BASE = cg.Case("probe", (1, 5, 129), (1328, 18, 463), 4, 4, 256, 16, 2048, torch.bfloat16,
               (AttentionParams(causal=True, window_size=(255, 0)),), True, 0)  # fmt: skip


def errors(ops, case: cg.Case) -> str:
    batch = cg.make_batch(case)
    params = case.schedules[0]
    plan = ops.make_attention_plan(**batch.plan_args, layer_params=case.schedules)
    tokens = batch.q.shape[0]
    out = torch.full((tokens, case.heads * case.head_dim), 7.0, dtype=case.dtype, device="cuda")
    ops.paged_attention_out(batch.q, batch.k_cache, batch.v_cache, out, plan=plan, params=params)
    exact = cg.reference(case, batch, params, upcast=True)
    low = cg.reference(case, batch, params, upcast=False)
    diff = (out.view(tokens, case.heads, case.head_dim).float() - exact.float()).abs()
    ref_max = (low.float() - exact.float()).abs().max().item()
    starts = [0]
    for n in case.q_lens:
        starts.append(starts[-1] + n)
    per_seq = [f"{diff[a:b].max().item():.3g}" for a, b in zip(starts, starts[1:])]
    verdict = "WRONG" if diff.max().item() > 2 * ref_max + 1e-5 else "ok"
    return f"{verdict:5s} max {diff.max().item():.3g} (ref {ref_max:.3g}) per sequence {per_seq}"


def main() -> None:
    ops = attn_dispatch.load("cuda")
    variants = {"base": BASE}
    for splits in (1, 2, 4):
        for pack in (None, False, True):
            variants[f"splits={splits} pack_gqa={pack}"] = dataclasses.replace(
                BASE, schedules=(AttentionParams(causal=True, window_size=(255, 0), num_splits=splits, pack_gqa=pack),))
    for pack in (False, True):
        variants[f"splits=0 pack_gqa={pack}"] = dataclasses.replace(
            BASE, schedules=(AttentionParams(causal=True, window_size=(255, 0), pack_gqa=pack),))
    for heads in ((8, 8), (2, 2), (1, 1), (4, 2), (4, 1), (8, 2)):
        variants[f"heads={heads}"] = dataclasses.replace(BASE, heads=heads[0], kv_heads=heads[1])
    for d in (64, 128, 160, 192, 224):
        variants[f"head_dim={d}"] = dataclasses.replace(BASE, head_dim=d)
    for window in ((127, 0), (511, 0), (1023, 0), (255, 255), (64, 64), (-1, -1)):
        causal = window[1] == 0
        variants[f"window={window} causal={causal}"] = dataclasses.replace(
            BASE, schedules=(AttentionParams(causal=causal, window_size=window),))
    variants["window=(255,0) causal=False"] = dataclasses.replace(BASE, schedules=(AttentionParams(causal=False, window_size=(255, 0)),))
    for q, k in (((129,), (463,)), ((5,), (18,)), ((1,), (1328,)), ((64,), (463,)), ((129,), (2000,)), ((200,), (200,)), ((129, 129), (463, 463))):
        variants[f"q={q} k={k}"] = dataclasses.replace(BASE, q_lens=q, k_lens=k)
    variants["page=1"] = dataclasses.replace(BASE, page_size=1, num_pages=4096)
    variants["page=128"] = dataclasses.replace(BASE, page_size=128, num_pages=64)
    variants["float16"] = dataclasses.replace(BASE, dtype=torch.float16)
    for label, case in variants.items():
        try:
            print(f"| {label:34s} | {errors(ops, case)} |", flush=True)
        except Exception as exc:  # noqa: BLE001
            print(f"| {label:34s} | raised {type(exc).__name__}: {str(exc)[:120]} |", flush=True)


if __name__ == "__main__":
    main()
