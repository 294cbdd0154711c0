"""The evidence behind cuda_fa3's known-wrong entry for vllm 0.33.0's FA3 (issue 12): one sequence, the
window width varied, FA3 through our provider and through vllm's own Python API against the fp32 torch
reference and fp32 SDPA with the same mask; then the cost of the guard's dense route against the kernel.

    python3 benchmarks/diag_fa3_sweep.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "cuda_fa3" / "tests"))
import conformance_grid as cg  # noqa: E402

from attn_dispatch import AttentionParams  # noqa: E402
from attn_dispatch_cuda_fa3 import resolve_provider  # noqa: E402
from attn_dispatch_cuda_fa3.dense import bind_dense  # noqa: E402
from attn_dispatch_flash import FlashArgs  # noqa: E402


def varlen_args(lq: int, lk: int, d: int, window, causal: bool, splits=0, pack=None) -> FlashArgs:
    cu = lambda n: torch.tensor([0, n], dtype=torch.int32, device="cuda")  # noqa: E731
    return FlashArgs(cu_seqlens_q=cu(lq), cu_seqlens_k=cu(lk), max_seqlen_q=lq, max_seqlen_k=lk, softmax_scale=d**-0.5,
                     causal=causal, window_size=window, num_splits=splits, pack_gqa=pack)  # fmt: skip


def one(provider, api, lq, lk, h, hk, d, window, causal, dtype=torch.bfloat16, splits=0, pack=None) -> None:
    params = AttentionParams(causal=causal, window_size=window)
    case = cg.Case("sweep", (lq,), (lk,), h, hk, d, 16, -(-lk // 16) + 1, dtype, (params,), False, 3)
    b = cg.make_batch(case)
    exact = cg.reference(case, b, params, upcast=True)
    low = cg.reference(case, b, params, upcast=False)
    k, v = b.packed["k"], b.packed["v"]
    args = varlen_args(lq, lk, d, window, causal, splits, pack)
    ours = provider.bind(args)(b.q, k, v, torch.empty_like(b.q))
    theirs = api(b.q, k, v, lq, args.cu_seqlens_q, lk, cu_seqlens_k=args.cu_seqlens_k, softmax_scale=d**-0.5,
                 causal=causal, window_size=list(window), fa_version=3)  # fmt: skip
    dense = bind_dense(args)(b.q, k, v, torch.empty_like(b.q))
    mask = cg.visible(lq, lk, params, "cuda")
    heads_first = lambda t: t.transpose(0, 1).float().repeat_interleave(h // t.shape[1], 0)  # noqa: E731
    sdpa = F.scaled_dot_product_attention(b.q.transpose(0, 1).float(), heads_first(k), heads_first(v), attn_mask=mask)
    err = lambda t: (t.float() - exact).abs().max().item()  # noqa: E731
    allowed = 2 * err(low) + 1e-5
    verdict = "WRONG" if err(ours) > allowed else "ok"
    print(f"| {lq}/{lk} | {h}/{hk} | {d} | {window} causal={causal} | {str(dtype)[6:]} splits={splits} pack_gqa={pack} "
          f"| {verdict} {err(ours):.3g} | {err(theirs):.3g} same bytes={torch.equal(ours, theirs)} "
          f"| {err(dense):.3g} | {err(sdpa.transpose(0, 1)):.2g} | {allowed:.3g} |", flush=True)  # fmt: skip


def main() -> None:
    from vllm.vllm_flash_attn import flash_attn_varlen_func as api

    provider = resolve_provider("sm90")
    print(f"provider: {provider.describe()}")
    print("| q/k | heads | d | window | dtype, schedule | FA3 via ops' provider | vllm API | dense route | fp32 SDPA | allowed |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for width in (100, 150, 176, 200, 255, 300, 400, 500, 640):
        one(provider, api, 651, 651, 32, 8, 256, (width, 0), True)
    for d in (64, 128, 192):
        one(provider, api, 651, 651, 32, 8, d, (300, 0), True)
    one(provider, api, 651, 651, 32, 8, 256, (300, 0), True, splits=1, pack=False)
    one(provider, api, 651, 651, 32, 8, 256, (300, 0), False)
    one(provider, api, 651, 651, 32, 8, 256, (300, 0), True, dtype=torch.float16)
    one(provider, api, 651, 651, 1, 1, 256, (300, 0), True)
    one(provider, api, 396, 632, 32, 8, 256, (300, 0), True)
    one(provider, api, 165, 1150, 16, 16, 128, (1000, 0), True)

    from triton.testing import do_bench

    print("\ncost of the dense route (us per call, do_bench median):")
    for lq, heads, d in ((2048, (32, 8), 128), (4096, (16, 8), 256)):
        q = torch.randn(lq, heads[0], d, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(lq, heads[1], d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        args = varlen_args(lq, lq, d, (255, 0), True)
        out = torch.empty_like(q)
        kernel, dense = provider.bind(args), bind_dense(args)
        t_kernel = do_bench(lambda: kernel(q, k, v, out), warmup=20, rep=200) * 1000
        t_dense = do_bench(lambda: dense(q, k, v, out), warmup=5, rep=100) * 1000
        print(f"- one sequence of {lq}, {heads[0]}/{heads[1]} heads, d {d}, window (255, 0): kernel {t_kernel:.0f} us, "
              f"dense route {t_dense:.0f} us ({t_dense / t_kernel:.0f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
