"""varlen_diffusion's pack (K,V gather) and scatter kernels: grid order x block rows, at the bar's sizes.

    python benchmarks/sweep_varlen_kernels.py

For Qwen-Image masks (24 heads, d=128, bf16; both layouts), times each tuning of ``gather_rows((k, v))``
and ``scatter_rows`` (do_bench medians, L2 flushed, 200 ms each, the median of 3 interleaved rounds) and
prints the share of the 4.25 TB/s copy ceiling (bytes read + written). Needs a CUDA GPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton.testing
from attn_dispatch_varlen_diffusion.kernels import gather_rows, scatter_rows

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "varlen_diffusion" / "tests"))
from varlen_masks import text_image_mask  # noqa: E402

HEADS, HEAD_DIM, CEILING = 24, 128, 4.25e12
SHAPES = [(1, 4096, 256), (1, 4096, 512), (2, 4096, 256), (2, 16384, 512)]  # batch, image, text


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3


def main() -> int:
    if not torch.cuda.is_available():
        print("sweep_varlen_kernels: needs a CUDA GPU (nothing measured)")
        return 0
    for batch, image, text in SHAPES:
        seqlen = image + text
        valid_text = [text - (b + 1) * text // 4 for b in range(batch)]
        for text_first in (True, False):
            mask = text_image_mask(valid_text, text, image, text_first=text_first).cuda()
            indices = mask.flatten().nonzero().flatten().to(torch.int32)
            n = indices.numel()
            inverse = torch.full((batch * seqlen,), -1, dtype=torch.int32, device="cuda")
            inverse[indices.long()] = torch.arange(n, dtype=torch.int32, device="cuda")
            q, k, v = (torch.randn(batch, seqlen, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            packed = gather_rows((q,), indices)[0]
            samples: dict[tuple, list[float]] = {}
            for _ in range(3):
                for heads_inner in (True, False):
                    for block_rows in (16, 32):
                        kw = {"heads_inner": heads_inner, "block_rows": block_rows}
                        samples.setdefault(("pack K,V", heads_inner, block_rows), []).append(bench(lambda: gather_rows((k, v), indices, **kw)))
                        samples.setdefault(("scatter", heads_inner, block_rows), []).append(bench(lambda: scatter_rows(packed, inverse, batch, seqlen, **kw)))
            nbytes = {"pack K,V": 2 * 2 * n * HEADS * HEAD_DIM * 2, "scatter": (n + batch * seqlen) * HEADS * HEAD_DIM * 2}
            line = [f"B={batch} {image}+{text} {'text first' if text_first else 'image first'}, {n} rows:"]
            for (kernel, heads_inner, block_rows), times in sorted(samples.items()):
                us = sorted(times)[1]
                order = "heads inner" if heads_inner else "rows inner"
                line.append(f"{kernel} {order} {block_rows} rows {us:.1f} us {100 * nbytes[kernel] / us / 1e-6 / CEILING:.0f}%")
            print(" | ".join(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
