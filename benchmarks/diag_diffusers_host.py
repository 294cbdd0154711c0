"""Where the eager host time of a diffusers forward goes, with and without the attn_dispatch backend.

    python benchmarks/diag_diffusers_host.py [--layers 4]

For Qwen-Image at B=1 (text 256, 40 padded) and PRX (cross-attention): host time to enqueue one forward
(no sync inside; the GPU runs behind), wall time per forward, syncs seen by torch's sync debug mode during
one attn_dispatch forward, how many attention calls took the fast path, and a cProfile of attn_dispatch
forwards (top functions by own time).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_diffusers as bd  # noqa: E402
from diffusers import PRXTransformer2DModel, QwenImageTransformer2DModel  # noqa: E402

import attn_dispatch.integrations.diffusers as ad  # noqa: E402


def enqueue_and_wall(fn, n=30):
    enq, wall = [], []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        enq.append((t1 - t0) * 1e3)
        wall.append((t2 - t0) * 1e3)
    return statistics.median(enq), statistics.median(wall)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    bd.ARGS = argparse.Namespace(smoke=False)
    device, dtype = torch.device("cuda"), torch.bfloat16
    ops = __import__("attn_dispatch").load(device)
    calls = {"n": 0}
    real = ops.masked_attention

    cases = [
        ("Qwen-Image", QwenImageTransformer2DModel, bd.QWEN, "num_layers", bd.qwen_inputs(device, dtype, 128)),
        ("PRX", PRXTransformer2DModel, bd.PRX, "depth", bd.prx_inputs(device, dtype, 128, bd.PRX)),
    ]
    for name, cls, config, key, inputs_for in cases:
        native, ours = bd.make_pair(cls, config, key, args.layers, device, dtype)
        masked = inputs_for(1, 256, (40,))
        mask_key = masked.pop("_mask_key")
        unmasked = {**masked, mask_key: None}

        def fwd(model, inputs):
            def run():
                with torch.no_grad():
                    return model(**inputs)[0]
            return run

        fns = {"native no mask": fwd(native, unmasked), "native masked": fwd(native, masked), "attn_dispatch": fwd(ours, masked)}
        for fn in fns.values():
            fn(), fn()
        print(f"\n## {name}, {args.layers} blocks, B=1 text 256 (40 padded)")
        print("| forward | host enqueue ms | wall ms |\n|---|---|---|")
        for label, fn in fns.items():
            e, w = enqueue_and_wall(fn)
            print(f"| {label} | {e:.2f} | {w:.2f} |")

        # fast-path count and exactness
        from attn_dispatch_varlen_diffusion import attention as va
        cls_ma = va.VarlenDiffusionAttention.masked_attention
        counter = {"n": 0}

        def counting(self, *a, **k):
            counter["n"] += 1
            return cls_ma(self, *a, **k)

        va.VarlenDiffusionAttention.masked_attention = counting
        try:
            out = fns["attn_dispatch"]()
        finally:
            va.VarlenDiffusionAttention.masked_attention = cls_ma
        ref = fns["native masked"]()
        print(f"plugin masked_attention calls in one attn_dispatch forward: {counter['n']}; "
              f"max abs err vs native masked {(out.float() - ref.float()).abs().max().item():.4g}; equal: {torch.equal(out, ref)}")

        torch.cuda.set_sync_debug_mode(1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fns["attn_dispatch"]()
            torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode(0)
        syncs = [str(w.message).splitlines()[0] for w in caught if "sync" in str(w.message).lower()]
        print(f"syncs in one attn_dispatch forward: {len(syncs)} {syncs[:3]}")

        prof = cProfile.Profile()
        torch.cuda.synchronize()
        prof.enable()
        for _ in range(20):
            fns["attn_dispatch"]()
        prof.disable()
        torch.cuda.synchronize()
        stats = pstats.Stats(prof)
        stats.sort_stats("tottime")
        print("cProfile, 20 attn_dispatch forwards, top by own time:")
        stats.print_stats(22)
        stats.sort_stats("cumtime")
        stats.print_stats("attn_dispatch|varlen|flash", 25)
        del native, ours
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
