"""diffusers models with the ``attn_dispatch`` backend vs diffusers' native attention, per forward.

    python benchmarks/bench_diffusers.py [--quick] [--json FILE] [--layers 4] [--no-compile] [--key-pages]
                                         [--compile-mode reduce-overhead] [--smoke]

Qwen-Image (``QwenImageTransformer2DModel``, its real config at full width: 24 heads x 128, text dim
3584, in 64 / out 16 channels, patch 2, RoPE axes (16, 56, 56); ``--layers`` blocks, random weights),
1024x1024 (4096 image tokens), bf16, at B=1 with text 256 (40 padded) and B=2 with text 512 (100 and 113
padded; right padding, as pipelines pad). Three forwards of one set of weights:

- ``native masked``: diffusers' native backend with ``encoder_hidden_states_mask`` (SDPA + bool mask);
- ``native no mask``: the same with ``encoder_hidden_states_mask=None`` (the floor: SDPA's flash kernel);
- ``attn_dispatch``: ``attn_dispatch.integrations.diffusers.enable(model)``, with the mask.

Reported: wall time per forward (median over interleaved rounds, synchronised after each forward), eager
and ``torch.compile``d; GPU time per forward (sum of kernel times in ``torch.profiler``); attention time
per call (one block's captured q/k/v, CUDA-event timed); metadata builds per forward (the benchmark, like a
pipeline's steps, passes the same mask tensor each forward, so the metadata is reused: the column "new
mask tensor each forward" is the eager cost when it is rebuilt every forward); correctness: max abs
error of ``attn_dispatch`` vs native masked over the output (image tokens, all valid query rows) next to
the output's max abs value. Bars (issue 11): eager and compiled ``attn_dispatch`` <= 1.02x no mask,
eager native masked / ``attn_dispatch`` >= 1.10x.

Cross-attention model: PRX (``PRXTransformer2DModel``: image queries over [text, image] keys, text
padding mask; its default config at ``--layers`` blocks: hidden 1792, 28 heads x 64, text dim 2304),
1024x1024 (4096 latent tokens), text 256 (40 padded), eager: attention time per call and forward time
against native, with correctness. (Sana and PixArt-Sigma call SDPA directly in diffusers 0.42, not the
dispatcher, so no attention backend reaches them.)

``--key-pages``: an A/B row in the same rounds, "attn_dispatch, K/V as pages": the same enabled model with
an op group that reads K/V in place through one-row pages (``build_ops(key_pages=True)``) instead of
gathering them (one launch fewer per call: less host time, more GPU time; see the README), eager and compiled.
Each of the two attn_dispatch forwards injects its own op group (``use_ops``), so their host paths match.

``--compile-mode reduce-overhead``: the compiled rows run in CUDA graphs (Inductor's graph partitioning
leaves the plugin's op out of the captured partitions: its calls depend on the mask; see the plugin's
``custom_ops``).

``--smoke`` (the default without CUDA): tiny configs on the CPU through the varlen_diffusion plugin's CPU
stand-in provider (Triton interpreted), compile with ``aot_eager``; checks the script, timings mean nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the plugin's kernels import triton

from diffusers import PRXTransformer2DModel, QwenImageTransformer2DModel  # noqa: E402
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry  # noqa: E402

import attn_dispatch  # noqa: E402
import attn_dispatch.integrations.diffusers as ad  # noqa: E402

QWEN = dict(patch_size=2, in_channels=64, out_channels=16, attention_head_dim=128, num_attention_heads=24,
            joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56))  # fmt: skip
QWEN_SMOKE = dict(patch_size=2, in_channels=16, out_channels=4, attention_head_dim=32, num_attention_heads=2,
                  joint_attention_dim=24, guidance_embeds=False, axes_dims_rope=(8, 12, 12))  # fmt: skip
PRX = dict(in_channels=16, patch_size=2, context_in_dim=2304, hidden_size=1792, mlp_ratio=3.5, num_heads=28, axes_dim=[32, 32])
PRX_SMOKE = dict(in_channels=4, patch_size=2, context_in_dim=24, hidden_size=64, mlp_ratio=2.0, num_heads=2, axes_dim=[16, 16])
# (batch, text tokens, padded tokens per row)
SETTINGS = [(1, 256, (40,)), (2, 512, (100, 113))]
SETTINGS_SMOKE = [(1, 8, (3,)), (2, 12, (4, 5))]
BARS = {"vs_no_mask": 1.02, "speedup": 1.10}


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def text_mask(batch: int, text: int, pads: tuple[int, ...], device) -> torch.Tensor:
    """int64 [B, text], 1 = token, 0 = padding at the end (what the pipelines' tokenizers give)."""
    mask = torch.ones(batch, text, dtype=torch.int64, device=device)
    for row, pad in enumerate(pads):
        mask[row, text - pad :] = 0
    return mask


def wall_ms(fns: dict, rounds: int, per_round: int) -> dict:
    """Median wall ms per forward of each callable, rounds interleaved (order rotated each round),
    synchronised after each call. Also, under the key ``PAIRED``, each label's paired ratio to native no
    mask: the median over rounds of the two medians' ratio within a round (a host whose speed drifts
    between rounds moves both alike)."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    per_round_ms: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        turn = round_ % len(names)
        for name in names[turn:] + names[:turn]:
            fn, samples = fns[name], []
            for _ in range(per_round):
                start = time.perf_counter()
                fn()
                sync()
                samples.append((time.perf_counter() - start) * 1e3)
            times[name] += samples
            per_round_ms[name].append(statistics.median(samples))
    result: dict = {name: statistics.median(t) for name, t in times.items()}
    floor = per_round_ms.get("native no mask")
    if floor is not None:
        result[PAIRED] = {
            name: statistics.median(a / b for a, b in zip(per_round_ms[name], floor)) for name in names
        }  # fmt: skip
    return result


def gpu_ms(fn, iters: int) -> float | None:
    """Sum of device (kernel, memcpy, memset) times per call from torch.profiler; None without CUDA."""
    if not CUDA:
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        sync()
    total_us = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA)
    return total_us / iters / 1e3


def event_us(fn, iters: int) -> float:
    """Median us per call (CUDA events around a batch of calls; perf_counter on CPU)."""
    fn()
    sync()
    samples = []
    for _ in range(5):
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3 / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            samples.append((time.perf_counter() - t0) * 1e6 / iters)
    return statistics.median(samples)


def capture_attention_call(model, inputs) -> dict:
    """The kwargs diffusers' dispatcher hands the native backend in the first attention call of a forward."""
    registry = _AttentionBackendRegistry._backends
    native = registry[AttentionBackendName.NATIVE]
    seen: list[dict] = []

    def capture(**kwargs):
        seen.append(dict(kwargs))
        return native(**kwargs)

    registry[AttentionBackendName.NATIVE] = capture
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        registry[AttentionBackendName.NATIVE] = native
    return seen[0]


def attention_times(kwargs: dict, iters: int) -> dict:
    """us per attention call: native masked, native without the mask, and the op with its metadata made
    once (as inside an enabled forward: the per-call path)."""
    native = _AttentionBackendRegistry._backends[AttentionBackendName.NATIVE]
    ops = ad.ops_for(kwargs["query"].device)
    mask = kwargs["attn_mask"]
    key_mask = mask[:, 0, 0, :] if mask.dim() == 4 else mask
    meta = ops.build_mask_meta(key_mask)
    q, k, v = kwargs["query"], kwargs["key"], kwargs["value"]
    with torch.no_grad():
        return {
            "native masked": event_us(lambda: native(**kwargs), iters),
            "native no mask": event_us(lambda: native(**{**kwargs, "attn_mask": None}), iters),
            "attn_dispatch": event_us(lambda: ops.masked_attention(q, k, v, meta, softmax_scale=kwargs["scale"]), iters),
        }


def builds_per_forward(model, inputs) -> list[int]:
    """Metadata builds in a first forward with a mask tensor, and in a second with the same tensor."""
    counting = Counting(ad.ops_for(inputs["hidden_states"].device))
    ad.use_ops(counting)
    builds = []
    try:
        with torch.no_grad():
            for _ in range(2):
                before = counting.builds
                model(**inputs)
                builds.append(counting.builds - before)
    finally:
        ad.use_ops(INJECTED)
    return builds


class Counting:
    def __init__(self, inner):
        self.inner, self.builds = inner, 0

    def build_mask_meta(self, key_mask):
        self.builds += 1
        return self.inner.build_mask_meta(key_mask)

    def masked_attention(self, *args, **kwargs):
        return self.inner.masked_attention(*args, **kwargs)


def error(out: torch.Tensor, ref: torch.Tensor) -> dict:
    out, ref = out.float(), ref.float()
    return {"max_abs_err": (out - ref).abs().max().item(), "mean_abs_err": (out - ref).abs().mean().item(),
            "out_max_abs": ref.abs().max().item()}  # fmt: skip


INJECTED = None  # the op group the smoke run injects (None on CUDA: attn_dispatch.load(device))
VARIANTS: dict = {}  # --key-pages: forward label -> the op group it runs with (both attn_dispatch forwards)
PAGES = "attn_dispatch, K/V as pages"
PAIRED = "paired vs no mask"  # wall_ms's key for the paired ratios


def with_variants(fns: dict, ours_fn) -> dict:
    """``fns`` with each :data:`VARIANTS` label run as ``ours_fn`` under its own op group."""
    def under(group):
        def run():
            ad.use_ops(group)
            try:
                ours_fn()
            finally:
                ad.use_ops(INJECTED)
        return run

    return {**fns, **{label: under(group) for label, group in VARIANTS.items()}}


def make_pair(cls, config: dict, layers_key: str, layers: int, device, dtype):
    """Two models with the same random weights: one native, one with attn_dispatch enabled."""
    torch.manual_seed(0)
    with torch.device(device):  # initialised on the GPU: a full-width CPU init takes tens of seconds
        native = cls(**config, **{layers_key: layers}).to(dtype=dtype).eval()
        # Zero-initialised gates (adaLN-zero, PRX's) would multiply every attention output by 0, and the
        # correctness column would compare nothing: give such parameters small random values.
        with torch.no_grad():
            for param in native.parameters():
                if not param.any():
                    param.normal_(0.0, 0.02)
    ours = copy.deepcopy(native)
    native.set_attention_backend("native")
    ad.enable(ours)
    return native, ours


def run_model(name, native, ours, inputs_for, settings, args, compile_backend) -> list[dict]:
    rows = []
    for index, (batch, text, pads) in enumerate(settings):
        masked = inputs_for(batch, text, pads)
        unmasked = {**masked, masked["_mask_key"]: None}
        mask_key = masked.pop("_mask_key")
        unmasked.pop("_mask_key")
        forwards = {
            "native masked": (native, masked),
            "native no mask": (native, unmasked),
            "attn_dispatch": (ours, masked),
        }
        row = {"model": name, "batch": batch, "text": text, "padded": list(pads)}
        with torch.no_grad():
            ref = native(**masked)[0]
            out = ours(**masked)[0]
        row["correctness"] = error(out, ref)
        row["builds_per_forward"] = builds_per_forward(ours, masked)
        row["attention_us"] = attention_times(capture_attention_call(native, masked), args.attn_iters)

        def call(model, inputs):
            def fn():
                with torch.no_grad():
                    model(**inputs)

            return fn

        eager = {label: call(m, i) for label, (m, i) in forwards.items()}

        def fresh_mask():  # a new mask tensor every forward: the metadata is built in each
            with torch.no_grad():
                ours(**{**masked, mask_key: masked[mask_key].clone()})

        eager["attn_dispatch, new mask each forward"] = fresh_mask
        eager = with_variants(eager, call(ours, masked))
        if VARIANTS:
            ad.use_ops(VARIANTS[PAGES])
            try:
                with torch.no_grad():
                    row["pages_correctness"] = error(ours(**masked)[0], ref)
            finally:
                ad.use_ops(INJECTED)
        for fn in eager.values():  # warm-up (allocator, cuBLAS handles, bound calls)
            fn(), fn()
        row["eager_ms"] = wall_ms(eager, args.rounds, args.per_round)
        row["gpu_ms"] = {label: gpu_ms(fn, args.profile_iters) for label, fn in eager.items()}
        skip = None
        if compile_backend is None:
            skip = "off"
        elif args.quick and index > 0:
            skip = "--quick compiles B=1 only"
        elif time.perf_counter() - START > args.budget_s:
            skip = f"time budget: {time.perf_counter() - START:.0f} s spent of --budget-s {args.budget_s:.0f}"
        if skip is None:
            try:
                compiled_rows(row, native, ours, forwards, masked, ref, call, compile_backend, args)
            except Exception as exc:  # keep the eager numbers; say what failed
                row["compile_error"] = f"{type(exc).__name__}: {exc}"[:500]
                print(f"compile failed: {row['compile_error']}", file=sys.stderr)
        else:
            row["compile_skipped"] = skip
        rows.append(row)
        print(f"[{time.perf_counter() - START:6.1f}s] {name} B={batch} text={text}: done", file=sys.stderr)
    return rows


def compiled_rows(row, native, ours, forwards, masked, ref, call, compile_backend, args) -> None:
    """Compiled wall and GPU time per forward, warm-up time and correctness, into ``row``."""
    t0 = time.perf_counter()
    torch._dynamo.reset()  # each setting's graphs only: models x masks x op groups would pass the recompile limit
    compiled_models = {
        id(m): torch.compile(m, backend=compile_backend, dynamic=False, mode=args.compile_mode) for m in (native, ours)
    }  # fmt: skip

    def begin() -> None:  # CUDA graph trees: each forward is a new step (outputs are not kept)
        if args.compile_mode is not None:
            torch.compiler.cudagraph_mark_step_begin()

    def step(model, inputs):
        fn = call(model, inputs)
        return fn if args.compile_mode is None else lambda: (begin(), fn())

    compiled = {label: step(compiled_models[id(m)], i) for label, (m, i) in forwards.items()}
    compiled = with_variants(compiled, step(compiled_models[id(ours)], masked))
    for fn in compiled.values():
        fn(), fn(), fn()
    sync()
    row["compile_warmup_s"] = time.perf_counter() - t0
    row["compiled_ms"] = wall_ms(compiled, args.rounds, args.per_round)
    row["compiled_gpu_ms"] = {label: gpu_ms(fn, args.profile_iters) for label, fn in compiled.items()}
    with torch.no_grad():
        begin()
        row["compiled_correctness"] = error(compiled_models[id(ours)](**masked)[0], ref)
        for label in VARIANTS:  # each op group's compiled forward, against native masked
            if label != "attn_dispatch":
                ad.use_ops(VARIANTS[label])
                try:
                    begin()
                    row[f"compiled_correctness, {label}"] = error(compiled_models[id(ours)](**masked)[0], ref)
                finally:
                    ad.use_ops(INJECTED)


def qwen_inputs(device, dtype, latent_hw: int):
    tokens_hw = latent_hw // 2

    def make(batch, text, pads):
        gen = torch.Generator(device=device).manual_seed(batch)
        channels = QWEN_SMOKE["in_channels"] if not CUDA or ARGS.smoke else QWEN["in_channels"]
        text_dim = QWEN_SMOKE["joint_attention_dim"] if not CUDA or ARGS.smoke else QWEN["joint_attention_dim"]
        return {
            "hidden_states": torch.randn(batch, tokens_hw * tokens_hw, channels, device=device, generator=gen).to(dtype),
            "encoder_hidden_states": torch.randn(batch, text, text_dim, device=device, generator=gen).to(dtype),
            "encoder_hidden_states_mask": text_mask(batch, text, pads, device),
            "timestep": torch.full((batch,), 0.5, device=device, dtype=dtype),
            "img_shapes": [[(1, tokens_hw, tokens_hw)]] * batch,
            "return_dict": False,
            "_mask_key": "encoder_hidden_states_mask",
        }

    return make


def prx_inputs(device, dtype, latent_hw: int, config: dict):
    def make(batch, text, pads):
        gen = torch.Generator(device=device).manual_seed(batch)
        return {
            "hidden_states": torch.randn(batch, config["in_channels"], latent_hw, latent_hw, device=device, generator=gen).to(dtype),
            "timestep": torch.full((batch,), 0.5, device=device, dtype=dtype),
            "encoder_hidden_states": torch.randn(batch, text, config["context_in_dim"], device=device, generator=gen).to(dtype),
            "attention_mask": text_mask(batch, text, pads, device).bool(),
            "return_dict": False,
            "_mask_key": "attention_mask",
        }

    return make


def fmt(x, digits=2):
    return "–" if x is None else f"{x:.{digits}f}"


def markdown(rows: list[dict]) -> str:
    out = []
    for row in rows:
        e, g, c, cg = row["eager_ms"], row["gpu_ms"], row.get("compiled_ms"), row.get("compiled_gpu_ms")
        title = f"### {row['model']}, B={row['batch']}, text {row['text']} (padded {', '.join(map(str, row['padded']))})"
        out += [title, "", "| per forward | native masked | native no mask | attn_dispatch | attn_dispatch / no mask | "
                "native masked / attn_dispatch | attn_dispatch, new mask tensor each forward |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for label, t in (("wall, eager (ms)", e), ("wall, compiled (ms)", c), ("GPU time, eager (ms)", g), ("GPU time, compiled (ms)", cg)):
            if t is None or t.get("attn_dispatch") is None:
                continue
            fresh = t.get("attn_dispatch, new mask each forward")
            vs_floor = t["attn_dispatch"] / t["native no mask"]
            speedup = t["native masked"] / t["attn_dispatch"]
            bar = "" if label.startswith("GPU") else (" ok" if vs_floor <= BARS["vs_no_mask"] else " **over bar**")
            bar2 = "" if "eager" not in label or label.startswith("GPU") else (" ok" if speedup >= BARS["speedup"] else " **under bar**")
            paired = t.get(PAIRED, {}).get("attn_dispatch")
            paired = "" if paired is None else f" (paired {paired:.3f}x)"
            out.append(f"| {label} | {fmt(t['native masked'])} | {fmt(t['native no mask'])} | {fmt(t['attn_dispatch'])} | "
                       f"{vs_floor:.3f}x{bar}{paired} | {speedup:.3f}x{bar2} | {fmt(fresh)} |")  # fmt: skip
        a = row["attention_us"]
        out.append(f"| attention per call (us) | {fmt(a['native masked'], 1)} | {fmt(a['native no mask'], 1)} | "
                   f"{fmt(a['attn_dispatch'], 1)} | {a['attn_dispatch'] / a['native no mask']:.3f}x | "
                   f"{a['native masked'] / a['attn_dispatch']:.3f}x | – |")  # fmt: skip
        corr = row["correctness"]
        line = (f"\nCorrectness (attn_dispatch vs native masked, eager): max abs err {corr['max_abs_err']:.3g}, mean "
                f"{corr['mean_abs_err']:.3g}, output max abs {corr['out_max_abs']:.3g}. Metadata builds: "
                f"{row['builds_per_forward'][0]} in a forward with a new mask tensor, {row['builds_per_forward'][1]} when "
                "the same tensor comes again (a pipeline's next step).")  # fmt: skip
        if "compile_error" in row:
            line += f" Compile failed: {row['compile_error']}."
        if "compile_skipped" in row and row["compile_skipped"] != "off":
            line += f" Compiled rows skipped ({row['compile_skipped']})."
        if "compiled_correctness" in row:
            cc = row["compiled_correctness"]
            line += f" Compiled vs native masked eager: max abs err {cc['max_abs_err']:.3g}; compile warm-up {row['compile_warmup_s']:.0f} s."
        if "pages_correctness" in row:
            pieces = [
                f"{label} {fmt(t.get(PAGES))} vs {fmt(t.get('attn_dispatch'))}"
                for label, t in (("eager wall", e), ("eager GPU", g), ("compiled wall", c), ("compiled GPU", cg))
                if t is not None and t.get(PAGES) is not None
            ]  # fmt: skip
            line += (f"\n\nK/V as pages (A/B, ms, pages vs gather, same rounds): {'; '.join(pieces)}; max abs err vs "
                     f"native masked {row['pages_correctness']['max_abs_err']:.3g}")  # fmt: skip
            compiled_pages = row.get(f"compiled_correctness, {PAGES}")
            line += "." if compiled_pages is None else f" (compiled {compiled_pages['max_abs_err']:.3g})."
        out += [line, ""]
    return "\n".join(out)


def main() -> None:
    global ARGS, INJECTED
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and iterations; compiled rows at B=1 only")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this file")
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks (>= 4 for the issue's numbers)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--no-prx", action="store_true", help="skip the cross-attention model")
    parser.add_argument("--key-pages", action="store_true", help="add the K/V-as-pages op group as an A/B forward")
    parser.add_argument("--budget-s", type=float, default=200.0,
                        help="skip later compiled rows once this many seconds are spent (keeps the run < 6 min)")
    parser.add_argument("--compile-mode", default=None, choices=("reduce-overhead", "max-autotune-no-cudagraphs"),
                        help="torch.compile's mode for the compiled rows (default: its default mode); reduce-overhead "
                        "runs the compiled forwards in CUDA graphs")
    parser.add_argument("--smoke", action="store_true", help="tiny configs on the CPU stand-in (default without CUDA)")
    ARGS = args = parser.parse_args()
    args.smoke = args.smoke or not CUDA
    args.rounds, args.per_round = (3, 5) if args.quick else (9, 6)
    args.profile_iters, args.attn_iters = (5, 20) if args.quick else (10, 50)
    if args.smoke:
        args.rounds, args.per_round, args.profile_iters, args.attn_iters, args.layers = 1, 2, 1, 2, min(args.layers, 2)
    device = torch.device("cuda" if CUDA and not args.smoke else "cpu")
    dtype = torch.bfloat16

    if args.smoke:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "varlen_diffusion" / "tests"))
        from attn_dispatch_varlen_diffusion.attention import build_ops
        from varlen_torch_provider import make_torch_provider

        INJECTED = build_ops(make_torch_provider(), device_type="cpu")
        ad.use_ops(INJECTED)
        resolution = "CPU stand-in provider (smoke)"
    else:
        res = attn_dispatch.load(device).resolutions["masked_attention"]
        resolution = f"{res.plugin}: {res.function} {res.note}"
        if res.plugin == "reference":
            sys.exit(f"masked_attention resolved to the reference on {device}: nothing to measure ({res.note})")
    compile_backend = None if args.no_compile else ("aot_eager" if args.smoke else "inductor")
    if args.smoke:
        args.compile_mode = None  # modes are Inductor's
    if args.key_pages:
        from attn_dispatch_varlen_diffusion.attention import build_ops as build_varlen_ops

        default = ad.ops_for(device)
        plugin = default.masked_attention.__self__  # the VarlenDiffusionAttention behind the op group
        pages = build_varlen_ops(
            plugin.provider, general_strategy=plugin.general_strategy, device_type=plugin.device_type, key_pages=True
        )  # fmt: skip
        VARIANTS.update({"attn_dispatch": default, PAGES: pages})

    settings = SETTINGS_SMOKE if args.smoke else SETTINGS
    latent = 8 if args.smoke else 128  # 1024x1024 -> 128x128 latents -> 64x64 = 4096 tokens
    qwen_config = QWEN_SMOKE if args.smoke else QWEN
    native, ours = make_pair(QwenImageTransformer2DModel, qwen_config, "num_layers", args.layers, device, dtype)
    rows = run_model("Qwen-Image", native, ours, qwen_inputs(device, dtype, latent), settings, args, compile_backend)
    del native, ours
    if not args.no_prx:
        prx_config = PRX_SMOKE if args.smoke else PRX
        try:
            native, ours = make_pair(PRXTransformer2DModel, prx_config, "depth", args.layers, device, dtype)
            rows += run_model("PRX (cross-attention)", native, ours, prx_inputs(device, dtype, latent, prx_config), settings[:1], args, None)
        except Exception as exc:  # keep the Qwen-Image numbers
            print(f"PRX failed: {type(exc).__name__}: {exc}", file=sys.stderr)

    header = (f"attn_dispatch diffusers backend: torch {torch.__version__}, diffusers {__import__('diffusers').__version__}, "
              f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU smoke'}, {args.layers} blocks, bf16, "
              f"compile mode {args.compile_mode or 'default'}; "
              f"masked_attention: {resolution}; total {time.perf_counter() - START:.0f} s")  # fmt: skip
    print(header + "\n\n" + markdown(rows))
    if args.json is not None:
        args.json.write_text(json.dumps({"header": header, "rows": rows}, indent=2))


START = time.perf_counter()
ARGS = None

if __name__ == "__main__":
    main()
