"""Which reroute answers the known-wrong FA3 class correctly (issue 12), and how wide the class is.

For random multi-sequence batches (paged and packed), the provider's own call is compared with the same
call split into head chunks of 2 and of 1 (the kernel scheduling each chunk itself), all against the fp32
torch reference of ``conformance_grid`` with FlashAttention's yardstick. Then the cost of each route on one
prefill shape.

    python3 benchmarks/diag_fa3_guard.py
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "cuda_fa3" / "tests"))
import conformance_grid as cg  # noqa: E402

from attn_dispatch import AttentionParams  # noqa: E402
from attn_dispatch_cuda_fa3 import resolve_provider  # noqa: E402
from attn_dispatch_flash import FlashArgs  # noqa: E402


def chunked(call, chunk: int, heads: int, paged: bool):
    """``call`` once per head chunk (views of q, k, v and out)."""
    if chunk >= heads:
        return call

    def run(q, k, v, out):
        for h in range(0, heads, chunk):
            s = slice(h, h + chunk)
            kk, vv = (k[:, :, s], v[:, :, s]) if paged else (k[:, s], v[:, s])
            call(q[:, s], kk, vv, out[:, s])
        return out

    return run


def routes(provider, case: cg.Case, batch: cg.Batch, params: AttentionParams):
    scale = case.head_dim**-0.5
    common = dict(softmax_scale=scale, causal=params.causal, window_size=params.window_size, softcap=params.softcap)
    paged = FlashArgs(cu_seqlens_q=batch.plan_args["cu_seqlens_q"], seqused_k=batch.plan_args["cache_seqlens"],
                      page_table=batch.page_table, max_seqlen_q=max(case.q_lens), max_seqlen_k=max(case.k_lens), **common)
    packed = FlashArgs(cu_seqlens_q=batch.packed["cu_seqlens_q"], cu_seqlens_k=batch.packed["cu_seqlens_k"],
                       max_seqlen_q=max(case.q_lens), max_seqlen_k=max(case.k_lens), **common)
    out = {}
    for op, args, k, v in (("paged", paged, batch.k_cache, batch.v_cache), ("packed", packed, batch.packed["k"], batch.packed["v"])):
        call = provider.bind(args)
        for chunk in (case.heads, 2, 1):
            if case.heads % chunk or case.heads != case.kv_heads and chunk < case.heads:
                continue
            out[(op, chunk)] = (chunked(call, chunk, case.heads, op == "paged"), k, v)
    return out


def check(provider, case: cg.Case) -> dict:
    batch = cg.make_batch(case)
    params = case.schedules[0]
    exact = cg.reference(case, batch, params, upcast=True)
    ref_max, ref_mean = cg.error(cg.reference(case, batch, params, upcast=False), exact)
    verdicts = {}
    for key, (call, k, v) in routes(provider, case, batch, params).items():
        o = torch.full_like(batch.q, 7.0)
        call(batch.q, k, v, o)
        m, a = cg.error(o, exact)
        verdicts[key] = (cg.within_yardstick(m, a, ref_max, ref_mean), m)
    return verdicts


def random_case(rng: random.Random, index: int, head_dim: int, heads: int, kv_heads: int, window, causal: bool) -> cg.Case:
    b = rng.choice((2, 3, 4, 8, 16))
    q_lens, k_lens = [], []
    for _ in range(b):
        lq = rng.choice((1, rng.randint(1, 64), rng.randint(64, 700)))
        q_lens.append(lq)
        k_lens.append(lq + rng.choice((0, rng.randint(0, 1500))))
    page = rng.choice((1, 16, 128))
    pages = b * -(-max(k_lens) // page) + 8  # randperm tables: one page per slot
    params = AttentionParams(causal=causal, window_size=window)
    return cg.Case("stress", tuple(q_lens), tuple(k_lens), heads, kv_heads, head_dim, page, pages,
                   rng.choice((torch.bfloat16, torch.float16)), (params,), False, index)


def main() -> None:
    provider = resolve_provider("sm90")
    print(f"provider {provider.describe()}")
    rng = random.Random(0)
    windows = [((255, 0), True), ((255, 0), False), ((63, 0), True), ((127, 0), True), ((200, 0), True),
               ((300, 0), True), ((511, 0), True), ((1000, 0), True), ((255, 255), False), ((100, 50), False),
               ((-1, -1), True), ((-1, -1), False)]
    shapes = [(256, 4, 4), (256, 8, 8), (256, 16, 16), (256, 32, 32), (224, 8, 8), (256, 2, 2),
              (192, 8, 8), (128, 16, 16), (256, 32, 8), (256, 16, 2)]
    tally: dict = {}
    index = 0
    for (d, h, hk) in shapes:
        for window, causal in windows:
            for _ in range(4):
                index += 1
                case = random_case(rng, index, d, h, hk, window, causal)
                for key, (ok, m) in check(provider, case).items():
                    row = tally.setdefault((d, h, hk, window, causal, key), [0, 0, 0.0, ""])
                    row[0] += 1
                    if not ok:
                        row[1] += 1
                        if m > row[2]:
                            row[2], row[3] = m, case.describe()
    print("| d | heads | window | causal | op | chunk | wrong/runs | worst max err | worst case |")
    for (d, h, hk, window, causal, (op, chunk)), (runs, wrong, worst, desc) in sorted(tally.items(), key=str):
        print(f"| {d} | {h}/{hk} | {window} | {causal} | {op} | {chunk} | {wrong}/{runs} | {worst:.3g} | {desc} |")

    # Cost of each route on one prefill step: 8 sequences of 512, 16 heads, d 256, window (255, 0).
    case = cg.Case("time", (512,) * 8, (512,) * 8, 16, 16, 256, 16, 8 * 32 + 8, torch.bfloat16,
                   (AttentionParams(causal=True, window_size=(255, 0)),), False, 1)
    batch = cg.make_batch(case)
    from triton.testing import do_bench

    for key, (call, k, v) in routes(provider, case, batch, case.schedules[0]).items():
        o = torch.empty_like(batch.q)
        ms = do_bench(lambda: call(batch.q, k, v, o), warmup=50, rep=300)
        print(f"time {key}: {ms * 1000:.1f} us")




def per_sequence(provider, case: cg.Case) -> None:
    """One failing case in detail: each sequence's error in the batch, then each sequence run alone, and
    vllm's FA2 on the same batch when the wheel has it."""
    batch = cg.make_batch(case)
    params = case.schedules[0]
    exact = cg.reference(case, batch, params, upcast=True)
    ref = cg.reference(case, batch, params, upcast=False)
    (call, k, v) = routes(provider, case, batch, params)[("packed", case.heads)]
    o = torch.full_like(batch.q, 7.0)
    call(batch.q, k, v, o)
    cu_q = [0, *torch.tensor(case.q_lens).cumsum(0).tolist()]
    cu_k = [0, *torch.tensor(case.k_lens).cumsum(0).tolist()]
    print(f"case {case.describe()}")
    fa2 = None
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func

        fa2 = flash_attn_varlen_func(batch.q, k, v, max(case.q_lens), batch.packed["cu_seqlens_q"], max(case.k_lens),
                                     cu_seqlens_k=batch.packed["cu_seqlens_k"], softmax_scale=case.head_dim**-0.5,
                                     causal=params.causal, window_size=list(params.window_size), fa_version=2)
    except Exception as exc:  # noqa: BLE001
        print(f"  fa2: {type(exc).__name__}: {str(exc)[:200]}")
    for b, (lq, lk) in enumerate(zip(case.q_lens, case.k_lens)):
        s = slice(cu_q[b], cu_q[b + 1])
        ref_err = (ref[s].float() - exact[s]).abs().max().item()
        err = (o[s].float() - exact[s]).abs().max().item()
        solo = cg.Case("solo", (lq,), (lk,), case.heads, case.kv_heads, case.head_dim, 1, 1, case.dtype, case.schedules, False, 0)
        args = FlashArgs(cu_seqlens_q=torch.tensor([0, lq], dtype=torch.int32, device="cuda"),
                         cu_seqlens_k=torch.tensor([0, lk], dtype=torch.int32, device="cuda"), max_seqlen_q=lq,
                         max_seqlen_k=lk, softmax_scale=case.head_dim**-0.5, causal=params.causal,
                         window_size=params.window_size)
        so = provider.bind(args)(batch.q[s], k[cu_k[b]:cu_k[b + 1]], v[cu_k[b]:cu_k[b + 1]], torch.empty_like(batch.q[s]))
        solo_err = (so.float() - exact[s]).abs().max().item()
        fa2_err = (fa2[s].float() - exact[s]).abs().max().item() if fa2 is not None else float("nan")
        flag = " <-- WRONG" if err > 2 * ref_err + 1e-5 else ""
        print(f"  seq {b}: q={lq} k={lk} err {err:.3g} alone {solo_err:.3g} fa2 {fa2_err:.3g} (ref {ref_err:.3g}){flag}")
    del solo


def details() -> None:
    provider = resolve_provider("sm90")
    rng = random.Random(0)
    shown = 0
    for index, (d, h, hk, window, causal) in enumerate(
        [(256, 8, 8, (255, 255), False), (128, 16, 16, (1000, 0), True), (256, 32, 8, (300, 0), True)] * 4, start=1000
    ):
        case = random_case(rng, index, d, h, hk, window, causal)
        if not all(ok for ok, _ in check(provider, case).values()) and shown < 5:
            per_sequence(provider, case)
            shown += 1


if __name__ == "__main__":
    details() if sys.argv[1:] == ["--details"] else main()
