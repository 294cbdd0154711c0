"""Where the eager host time of a diffusers forward goes, with and without the attn_dispatch backend.

    python benchmarks/diag_diffusers_host.py [--layers 4]

For Qwen-Image at B=1 (text 256, 40 padded) and PRX (cross-attention): host time to enqueue one forward
(no sync inside; the GPU runs behind) and wall time per forward (attn_dispatch with the scope's mask
elision on, the default, and off: "model mask kept"), syncs seen by torch's sync debug mode during
one attn_dispatch forward, how many attention calls took the fast path, and a cProfile of attn_dispatch
forwards (top functions by own time). ``--compiled``: for Qwen-Image, the same host/wall split for the
``torch.compile``d models (no mask, masked, attn_dispatch masked with and without elision), and
torch.profiler's CPU table of compiled forwards without a mask and with attn_dispatch.
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


def host_us(fn, calls=200, rounds=7):
    """Median host us per call with the GPU kept busy (torch.cuda._sleep), so only host work is timed."""
    fn()
    times = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        torch.cuda._sleep(int(4e8))
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(times)


def per_call(model, masked):
    """Host us per attention call through diffusers' dispatcher (block 0's arguments), and of the scope hooks."""
    import diffusers.models.transformers.transformer_qwenimage as tq
    from diffusers.models import attention_dispatch as dispatch
    from attn_dispatch.integrations import diffusers_scope as scope

    seen = {}
    real = tq.dispatch_attention_fn

    def record(*a, **k):
        seen.setdefault("call", (a, k))
        return real(*a, **k)

    tq.dispatch_attention_fn = record
    try:
        with torch.no_grad():
            kept(model, lambda: model(**masked))()  # so the recorded call has the processor's mask
    finally:
        tq.dispatch_attention_fn = real
    a, k = seen["call"]
    k = dict(k)
    mask = k.pop("attn_mask")
    k.pop("backend", None)
    native = dispatch.AttentionBackendName.NATIVE
    rows = {
        "dispatch -> native, no mask": lambda: real(*a, **k, attn_mask=None, backend=native),
        "dispatch -> native, mask": lambda: real(*a, **k, attn_mask=mask, backend=native),
    }
    kwargs = {key: v for key, v in masked.items()}
    scope._open_scope(model, (), kwargs)
    rows["dispatch -> attn_dispatch, mask (in scope)"] = lambda: real(*a, **k, attn_mask=mask, backend=ad.ATTN_DISPATCH)
    rows["dispatch -> attn_dispatch, mask elided (in scope)"] = lambda: real(*a, **k, attn_mask=None, backend=ad.ATTN_DISPATCH)
    results = {}
    with torch.no_grad():
        for label, fn in rows.items():
            results[label] = host_us(fn)
        scope._close_scope(model, (), kwargs, None)

        def hooks():
            scope._open_scope(model, (), kwargs)
            scope._close_scope(model, (), kwargs, None)

        results["scope hooks (open + close), per forward"] = host_us(hooks, calls=50)
        mask_cat = mask[:, 0, 0, :]
        results["(for scale) torch.cat of the joint mask"] = host_us(lambda: torch.cat([mask_cat, mask_cat], dim=1))
    print("| per call (host us, GPU kept busy) | us |\n|---|---|")
    for label, us in results.items():
        print(f"| {label} | {us:.1f} |")


def kept(model, fn):
    """``fn`` with the scope's mask elision off (the model builds its own mask in every block)."""
    def run():
        installed = model._attn_dispatch_scope
        installed.elide_model_mask = False
        try:
            return fn()
        finally:
            installed.elide_model_mask = True
    return run


def compiled_host(native, ours, masked, unmasked) -> None:
    """Where a compiled forward's host time goes: enqueue/wall of each compiled forward, then the CPU ops
    (self time) of no mask vs attn_dispatch."""
    from torch.profiler import ProfilerActivity, profile

    c_native, c_ours = torch.compile(native, dynamic=False), torch.compile(ours, dynamic=False)

    def fwd(model, inputs):
        def run():
            with torch.no_grad():
                return model(**inputs)[0]
        return run

    fns = {
        "compiled native no mask": fwd(c_native, unmasked), "compiled native masked": fwd(c_native, masked),
        "compiled attn_dispatch": fwd(c_ours, masked), "compiled attn_dispatch, model mask kept": kept(ours, fwd(c_ours, masked)),
    }  # fmt: skip
    for fn in fns.values():
        fn(), fn(), fn()
    print("\n## Qwen-Image compiled, B=1 text 256 (40 padded)\n| forward | host enqueue ms | wall ms |\n|---|---|---|")
    for _ in range(2):  # twice, rows in turns, for the host's drift
        for label, fn in fns.items():
            e, w = enqueue_and_wall(fn)
            print(f"| {label} | {e:.2f} | {w:.2f} |")
    for label in ("compiled native no mask", "compiled attn_dispatch"):
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                fns[label]()
            torch.cuda.synchronize()
        print(f"\ntorch.profiler CPU, 5 forwards of {label}, top by self CPU time:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--compiled", action="store_true", help="also the compiled Qwen-Image forwards")
    args = parser.parse_args()
    bd.ARGS = argparse.Namespace(smoke=False)
    device, dtype = torch.device("cuda"), torch.bfloat16

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

        if name == "Qwen-Image":
            per_call(ours, masked)
            if args.compiled:
                compiled_host(native, ours, masked, unmasked)
        fns = {
            "native no mask": fwd(native, unmasked), "native masked": fwd(native, masked), "attn_dispatch": fwd(ours, masked),
            "attn_dispatch, model mask kept": kept(ours, fwd(ours, masked)),
        }  # fmt: skip
        for fn in fns.values():
            fn(), fn()
        print(f"\n## {name}, {args.layers} blocks, B=1 text 256 (40 padded)")
        print("| forward | host enqueue ms | wall ms |\n|---|---|---|")
        for label, fn in fns.items():
            e, w = enqueue_and_wall(fn)
            print(f"| {label} | {e:.2f} | {w:.2f} |")

        # fast-path count (the op group holds bound methods made at load, so count through a profile of
        # one forward rather than by patching the class) and exactness
        counting = cProfile.Profile()
        counting.enable()
        out = fns["attn_dispatch"]()
        counting.disable()
        counter = {"n": sum(nc for (f, _, fn), (_, nc, *_rest) in pstats.Stats(counting).stats.items() if fn == "masked_attention" and "varlen_diffusion" in f)}
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
