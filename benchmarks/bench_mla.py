"""Original vs optimized path for the two MLA steps of the rocm plugins (issue 5).

    python benchmarks/bench_mla.py                 # on whatever device there is
    python benchmarks/bench_mla.py --profile       # also list the GPU kernels each path launches

- v-up projection (rocm_mxfp4): the GEMM into a contiguous (heads, batch, v) tensor, then the flatten copy,
  vs the GEMM written through ``buf.transpose(0, 1)`` of a (batch, heads, v) buffer, then a view.
  bf16 w_vc (torch.bmm) everywhere; MXFP4 w_vc and quantized o_proj inputs only on gfx950 with aiter.
- decode query assembly (rocm_nsa): split q_cat into views and torch.cat them again (the original), vs
  passing q_cat on and viewing it (the cat-skip).

Shapes: DeepSeek-V3 at TP8 (16 heads, kv_lora 512, v 128) and GLM-5-like at TP1 (all 64 heads on one
GPU, kv_lora 512, v 256, 576-wide NSA query); B in {1, 32, 256, 2048}.

Timing on a GPU, medians in microseconds per call: ``triton.testing.do_bench`` (device time between
events: host overhead is hidden while the GPU is busy), ``do_bench_cudagraph`` (a replayed CUDA graph,
as decode engines run) and wall time of back-to-back eager calls (host overhead and launches included).
Compare ratios from one run: the machine may be shared. On a CPU it runs with a plain timer as a smoke
test: those numbers say nothing about GPUs. Every row also checks both paths' outputs are byte-identical.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from attn_dispatch import reference
from attn_dispatch_rocm_mxfp4 import Kernels, make_v_up_proj
from attn_dispatch_rocm_nsa import mla_decode_query, mla_query_for_backend

REPO = Path(__file__).resolve().parent.parent
BATCHES = (1, 32, 256, 2048)


@dataclass(frozen=True)
class Model:
    name: str
    heads: int
    kv_lora_rank: int
    v_dim: int
    rope_dim: int = 64


MODELS = (
    Model("DeepSeek-V3 TP8", heads=16, kv_lora_rank=512, v_dim=128),
    Model("GLM-5-like TP1", heads=64, kv_lora_rank=512, v_dim=256),
)


@dataclass
class Timing:
    device_us: float  # do_bench median: device time between events (host overhead hidden while the GPU is busy)
    graph_us: float | None  # do_bench_cudagraph median: replayed CUDA graph, per call
    wall_us: float | None  # back-to-back calls, synchronized at the end: host overhead and launches included


@dataclass
class Row:
    op: str
    model: str
    batch: int
    original: Timing
    optimized: Timing
    identical: bool


# --- timing ----------------------------------------------------------------------------------------------


def time_us(fn: Callable[[], object], device: torch.device, cpu_reps: int) -> Timing:
    """Medians in microseconds; on a CPU only a plain timer (device_us), the rest None."""
    if device.type == "cpu":
        fn()
        samples = []
        for _ in range(cpu_reps):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e6)
        return Timing(statistics.median(samples), None, None)
    import triton.testing

    device_us = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
    try:
        graph_us = triton.testing.do_bench_cudagraph(fn, rep=30, return_mode="median") * 1e3
    except Exception as exc:  # an empty graph (the cat-skip launches nothing) may not be replayable
        print(f"  (CUDA-graph timing unavailable: {type(exc).__name__}: {exc})")
        graph_us = None
    return Timing(device_us, graph_us, wall_us(fn))


def wall_us(fn: Callable[[], object], calls: int = 200) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def same_bytes(a, b) -> bool:
    a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
    return len(a) == len(b) and all(
        x.shape == y.shape and torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8))
        for x, y in zip(a, b)
    )


# --- the two steps ---------------------------------------------------------------------------------------


def unavailable(*args, **kwargs):
    raise RuntimeError("needs aiter (gfx950)")


def v_up_proj_cases(kernels: Kernels, with_aiter: bool):
    """(label, weights, o_proj dtype) to run: bf16 w_vc into a bf16 o_proj always; the rest need aiter."""
    yield "v_up_proj bf16 w_vc, bf16 o_proj", "bf16", torch.bfloat16
    if with_aiter:
        yield "v_up_proj bf16 w_vc, fp8 o_proj", "bf16", torch.float8_e4m3fn
        for o_proj, label in ((torch.bfloat16, "bf16"), (torch.uint8, "mxfp4"), (torch.float8_e4m3fn, "fp8")):
            yield f"v_up_proj mxfp4 w_vc, {label} o_proj", "mxfp4", o_proj


def v_up_proj_inputs(model: Model, batch: int, weights: str, device: torch.device):
    gen = torch.Generator(device=device).manual_seed(batch)
    attn_output = torch.randn(batch, model.heads, model.kv_lora_rank, device=device, generator=gen, dtype=torch.bfloat16)
    if weights == "mxfp4":
        shape = (model.heads, model.v_dim, model.kv_lora_rank // 2)
        w_vc = torch.randint(0, 256, shape, device=device, generator=gen, dtype=torch.uint8)
        scale_shape = (model.heads, model.v_dim, model.kv_lora_rank // 32)
        w_vc_scale = torch.randint(120, 130, scale_shape, device=device, generator=gen, dtype=torch.uint8)
        return attn_output, w_vc, w_vc_scale
    w_vc = torch.randn(model.heads, model.kv_lora_rank, model.v_dim, device=device, generator=gen, dtype=torch.bfloat16)
    return attn_output, w_vc * model.kv_lora_rank**-0.5, None


def bench_v_up_proj(model, batch, kernels, label, weights, o_proj_dtype, device, cpu_reps) -> Row:
    attn_output, w_vc, w_vc_scale = v_up_proj_inputs(model, batch, weights, device)
    kwargs = dict(w_vc_scale=w_vc_scale, o_proj_weight_dtype=o_proj_dtype)
    original = make_v_up_proj(kernels, strided_output=False)
    optimized = make_v_up_proj(kernels, strided_output=True)
    identical = same_bytes(original(attn_output, w_vc, **kwargs), optimized(attn_output, w_vc, **kwargs))
    if weights == "bf16" and o_proj_dtype == torch.bfloat16:
        identical = identical and torch.equal(reference.mla_v_up_proj(attn_output, w_vc), optimized(attn_output, w_vc))
    before = time_us(lambda: original(attn_output, w_vc, **kwargs), device, cpu_reps)
    after = time_us(lambda: optimized(attn_output, w_vc, **kwargs), device, cpu_reps)
    return Row(label, model.name, batch, before, after, identical)


def decode_query_paths(model: Model):
    common = dict(num_heads=model.heads, kv_lora_rank=model.kv_lora_rank, decode_impl="tilelang")

    def original(q_cat):
        q, q_rope = reference.mla_query_for_backend(q_cat, None, is_decode=True, decode_impl="tilelang", kv_lora_rank=model.kv_lora_rank)
        return reference.mla_decode_query(q, q_rope, **common)

    def cat_skip(q_cat):
        q, q_rope = mla_query_for_backend(q_cat, None, is_decode=True, decode_impl="tilelang", kv_lora_rank=model.kv_lora_rank)
        return mla_decode_query(q, q_rope, **common)

    return original, cat_skip


def bench_decode_query(model, batch, device, cpu_reps) -> Row:
    q_cat = torch.randn(batch, model.heads, model.kv_lora_rank + model.rope_dim, device=device, dtype=torch.bfloat16)
    original, cat_skip = decode_query_paths(model)
    identical = same_bytes(original(q_cat), cat_skip(q_cat))
    before = time_us(lambda: original(q_cat), device, cpu_reps)
    after = time_us(lambda: cat_skip(q_cat), device, cpu_reps)
    return Row("decode query (tilelang)", model.name, batch, before, after, identical)


# --- the kernel listing (torch.profiler), with the aiter stand-ins from the tests where aiter is absent ---


def profile_kernels(device: torch.device, with_aiter: bool) -> None:
    """List each path's GPU kernels at B=256 (DeepSeek-V3 TP8), through attn_dispatch.load() on gfx950."""
    sys.path.insert(0, str(REPO / "plugins" / "rocm_mxfp4" / "tests"))
    import aiter_standins  # the tests' torch implementations of aiter's contract

    import attn_dispatch

    if not with_aiter:
        os.environ["ATTN_DISPATCH_ARCH"] = "gfx950"  # run the plugin glue on this GPU
    fake = nullcontext() if with_aiter else aiter_standins.fake_aiter_installed()
    with fake:
        ops = attn_dispatch.load(refresh=True)
        print(f"\n## Kernels per path (torch.profiler), {ops.summary()}")
        model, batch = MODELS[0], 256
        kernels = aiter_standins.standin_kernels() if not with_aiter else None
        cases = [("bf16", torch.bfloat16), ("mxfp4", torch.bfloat16), ("mxfp4", torch.uint8), ("mxfp4", torch.float8_e4m3fn)]
        for weights, o_proj_dtype in cases:
            attn_output, w_vc, w_vc_scale = v_up_proj_inputs(model, batch, weights, device)
            kwargs = dict(w_vc_scale=w_vc_scale, o_proj_weight_dtype=o_proj_dtype)
            original = make_v_up_proj(kernels or _aiter_kernels(), strided_output=False)
            for label, fn in (("original", original), ("optimized", ops.mla_v_up_proj)):
                glue, inside = _profile(aiter_standins, lambda: fn(attn_output, w_vc, **kwargs))
                copies = aiter_standins.copy_kernels(glue)
                print(f"- v_up_proj {weights} w_vc -> {o_proj_dtype} o_proj, {label}: glue kernels {glue}; "
                      f"copy/cat kernels in glue: {len(copies)}; kernels inside aiter stand-ins: {len(inside)}")
        q_cat = torch.randn(batch, model.heads, model.kv_lora_rank + model.rope_dim, device=device, dtype=torch.bfloat16)
        original, _ = decode_query_paths(model)

        def cat_skip():
            q, q_rope = ops.mla_query_for_backend(q_cat, None, is_decode=True, decode_impl="tilelang", kv_lora_rank=model.kv_lora_rank)
            return ops.mla_decode_query(q, q_rope, num_heads=model.heads, kv_lora_rank=model.kv_lora_rank, decode_impl="tilelang")

        for label, fn in (("original", lambda: original(q_cat)), ("optimized", cat_skip)):
            glue, _ = _profile(aiter_standins, fn)
            print(f"- decode query, {label}: kernels {glue}; copy/cat kernels: {len(aiter_standins.copy_kernels(glue))}")
    attn_dispatch.reset()


def _aiter_kernels() -> Kernels:
    from attn_dispatch_rocm_mxfp4 import aiter_kernels

    return aiter_kernels()


def _profile(aiter_standins, fn):
    fn()
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        torch.cuda.synchronize()
    return aiter_standins.kernels_by_origin(prof)


# --- main ------------------------------------------------------------------------------------------------


def has_gfx950_aiter() -> bool:
    if not (torch.cuda.is_available() and getattr(torch.version, "hip", None)):
        return False
    if not torch.cuda.get_device_properties(0).gcnArchName.startswith("gfx950"):
        return False
    try:
        _aiter_kernels()
    except Exception:
        return False
    return True


def compare(before: float | None, after: float | None) -> str:
    """'54.8 -> 9.3 (5.89x)': original -> optimized microseconds, and the speed-up."""
    if before is None or after is None:
        return "n/a"
    if after < 0.05:  # an empty CUDA graph: the cat-skip launches no kernel at all
        return f"{before:.1f} -> {after:.1f} (no device work)"
    return f"{before:.1f} -> {after:.1f} ({before / after:.2f}x)"


def print_table(rows: list[Row], on_gpu: bool) -> None:
    if on_gpu:
        print("\n## Original -> optimized, microseconds per call (medians)\n")
        print("device: triton do_bench (device time between events); graph: do_bench_cudagraph (replayed CUDA graph);")
        print("wall: 200 back-to-back eager calls then one sync (host overhead and launches included).\n")
        print("| op | shape | B | device | graph | wall | byte-identical |")
        print("|---|---|---|---|---|---|---|")
    else:
        print("\n## Original -> optimized, microseconds per call (CPU smoke run, perf_counter median)\n")
        print("| op | shape | B | CPU | byte-identical |")
        print("|---|---|---|---|---|")
    for r in rows:
        cells = [compare(r.original.device_us, r.optimized.device_us)]
        if on_gpu:
            cells += [compare(r.original.graph_us, r.optimized.graph_us), compare(r.original.wall_us, r.optimized.wall_us)]
        print(f"| {r.op} | {r.model} | {r.batch} | {' | '.join(cells)} | {'yes' if r.identical else 'NO'} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", help="default: 1 32 256 2048 on a GPU, 1 32 256 on CPU")
    parser.add_argument("--profile", action="store_true", help="list each path's GPU kernels (needs a GPU)")
    parser.add_argument("--cpu-reps", type=int, default=5, help="timer repeats on CPU")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)  # waking a thread pool costs more than these small ops: steadier numbers
    with_aiter = has_gfx950_aiter()
    batches = args.batches or (BATCHES if device.type == "cuda" else BATCHES[:3])
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke run: timings mean nothing for GPUs)"
    print(f"# bench_mla on {where}; torch {torch.__version__}; aiter kernels: {'yes' if with_aiter else 'no'}")
    kernels = _aiter_kernels() if with_aiter else Kernels(unavailable, unavailable, unavailable, provider="none")

    rows: list[Row] = []
    for model in MODELS:
        for batch in batches:
            for label, weights, o_proj_dtype in v_up_proj_cases(kernels, with_aiter):
                rows.append(bench_v_up_proj(model, batch, kernels, label, weights, o_proj_dtype, device, args.cpu_reps))
                print(f"  done: {label}, {model.name}, B={batch}", flush=True)
            rows.append(bench_decode_query(model, batch, device, args.cpu_reps))
            print(f"  done: decode query, {model.name}, B={batch}", flush=True)

    if args.profile and device.type == "cuda":
        profile_kernels(device, with_aiter)

    print_table(rows, on_gpu=device.type == "cuda")
    return 0 if all(r.identical for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
