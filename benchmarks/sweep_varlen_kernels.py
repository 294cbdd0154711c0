"""varlen_diffusion's pack (K,V gather) and scatter kernels: tilings x sizes, against torch copy_.

    python benchmarks/sweep_varlen_kernels.py

Qwen-Image text-first masks (24 heads, d=128, bf16), B=1 with 4096, 8192 and 16384 image tokens. Each
tiling (block_rows, num_warps) of ``gather_rows((k, v))`` and ``scatter_rows`` is timed in steady state
and cold (see ``bench_varlen_diffusion.steady_us`` / ``bench``) next to a torch ``copy_`` of the same
bytes, and printed as a share of the 4.25 TB/s copy ceiling (bytes read + written). Needs a CUDA GPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_varlen_diffusion import COPY_CEILING, bench, steady_us, text_image_mask  # noqa: E402

from attn_dispatch_flash.rows import gather_rows, scatter_rows  # noqa: E402

HEADS, HEAD_DIM = 24, 128
SHAPES = [(1, 4096, 256), (1, 8192, 256), (1, 16384, 512)]  # batch, image, text
TILINGS = [(32, 4), (16, 4), (32, 8), (64, 8), (64, 4), (16, 2)]  # block_rows, num_warps; the default first


def main() -> int:
    if not torch.cuda.is_available():
        print("sweep_varlen_kernels: needs a CUDA GPU (nothing measured)")
        return 0
    for batch, image, text in SHAPES:
        seqlen = image + text
        mask = text_image_mask([text - (b + 1) * text // 4 for b in range(batch)], text, image, text_first=True).cuda()
        indices = mask.flatten().nonzero().flatten().to(torch.int32)
        n = indices.numel()
        inverse = torch.full((batch * seqlen,), -1, dtype=torch.int32, device="cuda")
        inverse[indices.long()] = torch.arange(n, dtype=torch.int32, device="cuda")
        sets = [[torch.randn(batch, seqlen, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2)] for _ in range(4)]
        packs = [gather_rows((k,), indices)[0] for k, _ in sets]
        nbytes = {"pack K,V": 2 * 2 * n * HEADS * HEAD_DIM * 2, "scatter": (n + batch * seqlen) * HEADS * HEAD_DIM * 2}
        print(f"== B={batch} {image}+{text}: {n} valid rows of {batch * seqlen}", flush=True)
        for kernel, size in nbytes.items():
            sources = [torch.empty(size // 2, dtype=torch.uint8, device="cuda") for _ in sets]
            copies = [lambda src=src, dst=torch.empty_like(src): dst.copy_(src) for src in sources]
            copy = {"steady": steady_us(copies), "cold": bench(copies[0])}
            print(f"  torch copy_ of {kernel}'s {size / 1e6:.0f} MB: " + ", ".join(f"{m} {t:.1f} us {100 * size / t / 1e-6 / COPY_CEILING:.0f}%" for m, t in copy.items()))
            for block_rows, num_warps in TILINGS:
                kw = {"block_rows": block_rows, "num_warps": num_warps}
                if kernel == "pack K,V":
                    calls = [lambda kv=kv: gather_rows(kv, indices, **kw) for kv in sets]
                else:
                    calls = [lambda p=p: scatter_rows(p, inverse, batch, seqlen, **kw) for p in packs]
                times = {"steady": steady_us(calls), "cold": bench(calls[0])}
                print(f"  {kernel} rows={block_rows} warps={num_warps}: " + ", ".join(
                    f"{m} {t:.1f} us {100 * size / t / 1e-6 / COPY_CEILING:.0f}% ({100 * copy[m] / t:.0f}% of copy_)" for m, t in times.items()
                ), flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
