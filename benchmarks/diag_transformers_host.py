"""Where a decode step's host time goes, ``sdpa`` against ``attn_dispatch`` (issue 13's generate bar).

    python3 benchmarks/diag_transformers_host.py [--tiny]

The Llama-like model of ``bench_transformers`` generates from its left-padded batch; every attention
call, mask-function call, metadata build and plan/bind is wrapped by a CPU timer (the wrappers cost well
under a microsecond each). Printed per decode step (medians over steps and alternating rounds): the step's
wall time and how much of it each part took. A diagnosis, not a benchmark: the ratios that count come from
``bench_transformers``.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import attn_dispatch.integrations.transformers as ad_transformers
from attn_dispatch.integrations import transformers_build as build
from attn_dispatch.integrations import transformers_meta as meta
from bench_transformers import MODELS, StepClock, padded_batch, sync, tiny

clock: dict[str, float] = defaultdict(float)


def timed_as(name: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            clock[name] += time.perf_counter() - start

    return wrapper


def instrument() -> None:
    """Wrap, under the names transformers looks up, the attention and mask functions of both implementations."""
    for impl in ("sdpa", "attn_dispatch"):
        ALL_ATTENTION_FUNCTIONS._global_mapping[impl] = timed_as("attention", ALL_ATTENTION_FUNCTIONS[impl])
        ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[impl] = timed_as("mask", ALL_MASK_ATTENTION_FUNCTIONS[impl])
    build._build = timed_as("build", build._build)
    build._decode_step = timed_as("device_build", build._decode_step)
    meta.Meta.run_for = timed_as("run_for", meta.Meta.run_for)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--model", choices=tuple(MODELS), default="llama")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--gc", choices=("on", "freeze", "off"), default="on", help="Python's cyclic GC during the rounds")
    parser.add_argument("--profile", action="store_true", help="then cProfile one generate each: the functions that differ most")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    make_config = MODELS[args.model][0]
    config = tiny(make_config()) if args.tiny else make_config()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").to(device).eval()
    ids, mask = padded_batch(config.vocab_size, device)
    if args.tiny:
        ids, mask = ids[:, -64:], mask[:, -64:]
    instrument()
    if args.gc == "freeze":
        gc.collect()
        gc.freeze()  # the model and the imports move to the permanent generation: full collections get cheap
    elif args.gc == "off":
        gc.disable()
    print(f"gc: {args.gc}; thresholds {gc.get_threshold()}")
    rows = defaultdict(lambda: defaultdict(list))
    for round_ in range(args.rounds):
        for impl in ("sdpa", "attn_dispatch"):
            model.set_attn_implementation(impl)
            step_clock = StepClock()
            # each step's share: the clock is read at every step boundary (the stopping criterion)
            parts: list[dict] = []

            class PartClock(StepClock):
                def __call__(self, input_ids, scores, **kwargs):
                    parts.append(dict(clock))
                    return super().__call__(input_ids, scores, **kwargs)

            step_clock = PartClock()
            sync()
            collections = sum(g["collections"] for g in gc.get_stats())
            with torch.no_grad():
                model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                    do_sample=False, pad_token_id=0, stopping_criteria=[step_clock],
                )  # fmt: skip
            sync()
            rows[impl]["gc collections"].append(sum(g["collections"] for g in gc.get_stats()) - collections)
            if round_ == 0:
                continue  # warm-up: first generate of each implementation
            steps = step_clock.decode_steps_ms()
            rows[impl]["step"] += steps
            for name in ("attention", "mask", "build", "device_build", "run_for"):  # per step: the clock read at its two ends
                deltas = [(b.get(name, 0.0) - a.get(name, 0.0)) * 1e3 for a, b in zip(parts, parts[1:])]
                rows[impl][name] += deltas
    print(f"decode step, host ms (medians over {len(rows['sdpa']['step'])} steps):")
    print("| impl | step | attention fns | of which host build | of which device build | of which page tables+plan+bind (run_for) | mask fns | rest |")
    print("|---|---|---|---|---|---|---|---|")
    for impl, row in rows.items():
        med = {k: statistics.median(v) for k, v in row.items()}
        rest = med["step"] - med["attention"] - med["mask"]
        print(f"| {impl} | {med['step']:.3f} | {med['attention']:.3f} | {med['build']:.3f} | {med['device_build']:.3f} | {med['run_for']:.3f} | {med['mask']:.3f} | {rest:.3f} |")
    for impl, row in rows.items():
        print(f"{impl}: gc collections per generate {row['gc collections']}")
    print("stats:", ad_transformers.stats)
    if args.profile:
        profile_both(model, ids, mask, args.new_tokens)


def profile_both(model, ids, mask, new_tokens: int) -> None:
    """cProfile one generate per implementation; print the functions whose own time differs most per step."""
    own: dict[str, dict] = {}
    cumulative: dict[str, tuple[int, float]] = {}
    for impl in ("sdpa", "attn_dispatch"):
        model.set_attn_implementation(impl)
        profiler = cProfile.Profile()
        with torch.no_grad():
            profiler.enable()
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            profiler.disable()
        stats = pstats.Stats(profiler).stats  # (file, line, name) -> (cc, nc, tottime, cumtime, callers)
        own[impl] = {f"{Path(f).name}:{line}({name})": (nc, tt) for (f, line, name), (cc, nc, tt, ct, _) in stats.items()}
        if impl == "attn_dispatch":
            cumulative = {f"{Path(f).name}:{line}({name})": (nc, ct) for (f, line, name), (cc, nc, tt, ct, _) in stats.items() if name in PER_STEP}
    keys = set(own["sdpa"]) | set(own["attn_dispatch"])
    diff = sorted(keys, key=lambda k: abs(own["attn_dispatch"].get(k, (0, 0))[1] - own["sdpa"].get(k, (0, 0))[1]), reverse=True)
    print(f"cProfile, own time per decode step (us), the 30 largest differences ({new_tokens} steps):")
    for k in diff[:30]:
        (n_s, t_s), (n_a, t_a) = own["sdpa"].get(k, (0, 0)), own["attn_dispatch"].get(k, (0, 0))
        print(f"  {k}: sdpa {t_s / new_tokens * 1e6:.1f} ({n_s} calls), attn_dispatch {t_a / new_tokens * 1e6:.1f} ({n_a} calls)")
    print("attn_dispatch, cumulative time per decode step (us) of the per-step work (under cProfile: inflated):")
    for k, (n, t) in sorted(cumulative.items(), key=lambda item: -item[1][1]):
        print(f"  {k}: {t / new_tokens * 1e6:.1f} ({n} calls)")


# what a decode step does once per mask or op group, besides the layers' calls
PER_STEP = {
    "run_for", "metadata", "_decode_step", "pages", "one_query_pages", "visible_keys", "page_table", "make_attention_plan",
    "make_plan", "validate_make_attention_plan", "_scheduler_metadata", "bind_attention", "launch", "cu_seqlens_q",
}


if __name__ == "__main__":
    main()
