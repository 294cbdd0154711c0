"""cuda_fa3 inside transformers (issue 13): ``attn_implementation="attn_dispatch"`` against the built-in
implementations, in real model configurations with random weights (nothing downloaded), on one GPU.

    python3 benchmarks/bench_transformers.py [--models llama,gemma2] [--new-tokens 128] [--json PATH]

Models: a Llama-3.2-1B-like config (16 layers, 32/8 heads of 64) and a Gemma-2-2B-like config (26 layers,
8/4 heads of 256, sliding window 4096 on every other layer, attention softcap 50), bf16. Batch: 8 prompts
of 128 to 2048 tokens, left padded to 2048 (mostly padding, as a serving batch is).

Per model, for each implementation (the reference first: ``sdpa`` for Llama; ``eager`` for Gemma-2,
whose softcap ``sdpa`` ignores):
- prefill forward: wall ms (median of interleaved rounds, synchronised), GPU ms (profiler: all kernels,
  and the attention kernels alone), last-token logits against the reference (max abs error, argmax);
- ``generate``: greedy, ``--new-tokens`` tokens, tokens/s (median of interleaved rounds, the order rotated
  each round), the median of each round's ratio to ``sdpa``'s in the same round (the cold first round
  left out: a host whose speed drifts between rounds moves both sides of a ratio alike), the median
  decode step (ms, timed by a stopping criterion at every step of every round: robust to a round's slow
  moments, and free of the prefill), and whether the first two generated tokens
  (the prefill's argmax and the first decode step's) equal the reference's; where they differ, both
  top-2 margins (near-ties under random weights);
- the first decode step teacher forced (every implementation fed the reference's first token): argmax
  rows equal to the reference's and the largest logit difference;
- ``generate_batch`` (paged continuous batching), where the implementation is registered: seconds for
  the 8 requests x 64 new tokens (first call included), and whether the tokens equal ``paged|sdpa``'s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, Gemma2Config, GenerationConfig, LlamaConfig, StoppingCriteria, StoppingCriteriaList

import attn_dispatch.integrations.transformers as ad_transformers

PROMPT_LENS = [128, 402, 676, 950, 1224, 1498, 1772, 2048]
ATTENTION_KERNELS = ("flash", "fmha", "attention", "sdpa", "cudnn", "softmax")


def llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=True,
    )  # fmt: skip


def gemma2_config() -> Gemma2Config:
    return Gemma2Config(
        vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, sliding_window=4096, attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0, max_position_embeddings=8192,
    )  # fmt: skip


# (config, the reference the bars compare with, implementations run); eager is the ground truth in both.
MODELS = {"llama": (llama_config, "sdpa", ("sdpa", "eager", "attn_dispatch")), "gemma2": (gemma2_config, "eager", ("eager", "sdpa", "attn_dispatch"))}


def padded_batch(vocab: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    width = max(PROMPT_LENS)
    ids = torch.zeros(len(PROMPT_LENS), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(PROMPT_LENS):
        ids[row, width - n :] = torch.randint(3, vocab, (n,), generator=g)
        mask[row, width - n :] = 1
    return ids.to(device), mask.to(device)


class StepClock(StoppingCriteria):
    """Times each generation step (it is asked once per step, after the step's logits); stops nothing."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def decode_steps_ms(self) -> list[float]:
        """Durations of the decode steps (the first stamp ends the prefill step)."""
        return [(b - a) * 1e3 for a, b in zip(self.stamps, self.stamps[1:])]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def gpu_ms(fn, reps: int = 3) -> tuple[float, float]:
    """(all kernels, attention kernels) ms per call, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        return 0.0, 0.0
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    total = attention = 0.0
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", getattr(event, "cuda_time_total", 0.0))
        if event.key.startswith("ProfilerStep") or us <= 0 or getattr(event, "device_type", None) is None:
            continue
        if str(event.device_type).endswith("CUDA"):
            total += us
            if any(word in event.key.lower() for word in ATTENTION_KERNELS):
                attention += us
    return total / reps / 1e3, attention / reps / 1e3


def tiny(config):
    """``--tiny``: the same architecture at a size a CPU runs in seconds (a smoke test of this script)."""
    config.num_hidden_layers, config.hidden_size, config.intermediate_size, config.vocab_size = 2, 64, 128, 512
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 4, 2, 16
    return config


def bench_model(name: str, new_tokens: int, rounds: int, device: str, small: bool, generate_rounds: int = 3) -> dict:
    make_config, reference, implementations = MODELS[name]
    torch.manual_seed(0)
    config = tiny(make_config()) if small else make_config()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=reference)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    ids, mask = padded_batch(model.config.vocab_size, device)
    rows: dict[str, dict] = {impl: {} for impl in implementations}
    logits, tokens, scores = {}, {}, {}
    with torch.inference_mode():
        for impl in implementations:
            model.set_attn_implementation(impl)
            logits[impl] = model(ids, attention_mask=mask).logits[:, -1].float()
        walls: dict[str, list[float]] = {impl: [] for impl in implementations}
        for _ in range(rounds):  # interleaved: drift hits every implementation alike
            for impl in implementations:
                model.set_attn_implementation(impl)
                walls[impl].append(timed(lambda: model(ids, attention_mask=mask), 1))
        for impl in implementations:
            model.set_attn_implementation(impl)
            row = rows[impl]
            row["prefill_wall_ms"] = statistics.median(walls[impl])
            row["prefill_gpu_ms"], row["prefill_attention_gpu_ms"] = gpu_ms(lambda: model(ids, attention_mask=mask))
            for ref in dict.fromkeys((reference, "eager")):
                diff = (logits[impl] - logits[ref]).abs()
                row[f"logits_max_abs_err_vs_{ref}"] = diff.max().item()
                row[f"argmax_equal_vs_{ref}"] = bool(torch.equal(logits[impl].argmax(-1), logits[ref].argmax(-1)))
            row["logits_scale"] = logits[reference].abs().max().item()
            config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            warm = model.generate(
                ids, attention_mask=mask, generation_config=GenerationConfig(
                    max_new_tokens=2, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True
                ),
            )  # fmt: skip
            scores[impl] = [step.float() for step in warm.scores]  # the logits of the first two generated tokens
        rates: dict[str, list[float]] = {impl: [] for impl in implementations}
        steps: dict[str, list[float]] = {impl: [] for impl in implementations}
        for round_ in range(generate_rounds):  # interleaved, median kept: one slow moment of the host hits one round
            turn = round_ % len(implementations)  # the order rotates, so no implementation always runs first
            for impl in implementations[turn:] + implementations[:turn]:
                model.set_attn_implementation(impl)
                clock = StepClock()
                sync()
                t0 = time.perf_counter()
                out = model.generate(ids, attention_mask=mask, generation_config=config, stopping_criteria=StoppingCriteriaList([clock]))
                sync()
                tokens[impl] = out[:, ids.shape[1] :]
                rates[impl].append(tokens[impl].numel() / (time.perf_counter() - t0))
                steps[impl] += clock.decode_steps_ms()
        for impl in implementations:
            rows[impl]["generate_tokens_per_s"] = statistics.median(rates[impl])
            rows[impl]["generate_tokens_per_s_rounds"] = rates[impl]
            if "sdpa" in rates and generate_rounds > 1:  # each round against sdpa's in the same round; the first is cold
                ratios = [ours / theirs for ours, theirs in zip(rates[impl][1:], rates["sdpa"][1:])]
                rows[impl]["generate_paired_ratio_vs_sdpa"] = statistics.median(ratios)
            rows[impl]["decode_step_ms_median"] = statistics.median(steps[impl])
            rows[impl]["decode_step_ms_mean"] = statistics.fmean(steps[impl])  # what tokens/s pays: the tail too
            rows[impl]["decode_steps_timed"] = len(steps[impl])
        decode_logits = {}  # the first decode step, every implementation fed the reference's first token
        for impl in implementations:
            model.set_attn_implementation(impl)
            decode_logits[impl] = first_decode_step(model, ids, mask, tokens[reference][:, 0])
        for impl in implementations:
            ours, theirs = decode_logits[impl], decode_logits[reference]
            rows[impl][f"first_decode_step_argmax_rows_equal_vs_{reference}"] = int((ours.argmax(-1) == theirs.argmax(-1)).sum())
            rows[impl][f"first_decode_step_logits_max_abs_err_vs_{reference}"] = (ours - theirs).abs().max().item()
            if impl != reference:
                rows[impl][f"first_decode_step_disagreements_vs_{reference}"] = disagreements([ours], [theirs])
        for impl in implementations:
            for ref in dict.fromkeys((reference, "eager")):
                rows[impl][f"first_token_rows_equal_vs_{ref}"] = int((tokens[impl][:, 0] == tokens[ref][:, 0]).sum())
                rows[impl][f"second_token_rows_equal_vs_{ref}"] = int((tokens[impl][:, 1] == tokens[ref][:, 1]).sum())
                rows[impl][f"all_tokens_rows_equal_vs_{ref}"] = int((tokens[impl] == tokens[ref]).all(dim=1).sum())
                if impl != ref:
                    rows[impl][f"disagreements_vs_{ref}"] = disagreements(scores[impl], scores[ref])
    if name == "llama":  # generate_batch runs in its own thread: outside inference mode
        rows["paged"] = bench_paged(model, ids.clone(), mask.clone())
    return rows


def first_decode_step(model, ids, mask, first: torch.Tensor) -> torch.Tensor:
    """Logits of the first decode step with ``first`` as every row's first generated token (teacher forced,
    so every implementation decodes from the same prefix): the prefill into a DynamicCache at the positions
    ``generate`` uses for a left-padded batch, then one step."""
    position_ids = mask.long().cumsum(-1) - 1
    position_ids.masked_fill_(mask == 0, 1)
    prefill = model(ids, attention_mask=mask, position_ids=position_ids, use_cache=True)
    step_mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    step = model(
        first[:, None], attention_mask=step_mask, position_ids=position_ids[:, -1:] + 1,
        past_key_values=prefill.past_key_values, use_cache=True,
    )  # fmt: skip
    return step.logits[:, -1].float()


def disagreements(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> list[dict]:
    """Where the first two generated tokens differ: the row, the step, both top-2 margins (the gap between
    the two highest logits) and the largest logit difference. A margin below the difference is a near-tie
    that bf16 rounding decides (random weights make them: their logits are nearly flat)."""
    found = []
    for step, (a, b) in enumerate(zip(ours, theirs)):
        for row in (a.argmax(-1) != b.argmax(-1)).nonzero().flatten().tolist():
            top_a, top_b = a[row].topk(2).values, b[row].topk(2).values
            found.append(dict(
                step=step, row=row, our_margin=(top_a[0] - top_a[1]).item(), their_margin=(top_b[0] - top_b[1]).item(),
                logits_max_abs_diff=(a[row] - b[row]).abs().max().item(),
            ))  # fmt: skip
    return found


def bench_paged(model, ids, mask, graphs: bool = False) -> dict:
    """generate_batch with each paged implementation registered here; tokens compared with paged|sdpa.
    ``graphs``: continuous batching's CUDA graphs forced on (``ContinuousBatchingConfig(use_cuda_graph=True)``;
    by default transformers uses them only for FlashAttention names)."""
    from transformers import ContinuousBatchingConfig

    prompts = [row[m.bool()].tolist() for row, m in zip(ids.cpu(), mask.cpu())]
    config = GenerationConfig(max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=0, eos_token_id=None)
    results, outputs, logprobs = {}, {}, {}
    for impl in ("paged|sdpa", "paged|eager", "paged|attn_dispatch"):
        try:
            model.set_attn_implementation(impl)
            batching = ContinuousBatchingConfig(use_cuda_graph=True if graphs else None, return_logprobs=True)
            sync()
            t0 = time.perf_counter()
            done = model.generate_batch(inputs=prompts, generation_config=config, continuous_batching_config=batching)
            sync()
            seconds = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001  (report, keep benchmarking)
            results[impl] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            continue
        ordered = sorted(done, key=lambda k: int(k.split("_")[-1]) if k.split("_")[-1].isdigit() else k)
        outputs[impl] = [done[key].generated_tokens for key in ordered]
        logprobs[impl] = [done[key].logprobs for key in ordered]
        errors = [done[key].error for key in done if done[key].error]
        results[impl] = {"seconds": seconds, "generated_tokens": sum(map(len, outputs[impl])), "errors": errors[:1]}
    for impl, toks in outputs.items():
        if "paged|sdpa" in outputs:
            theirs = outputs["paged|sdpa"]
            results[impl]["requests_equal_to_paged_sdpa"] = sum(a == b for a, b in zip(toks, theirs))
            prefixes = [_common_prefix(a, b) for a, b in zip(toks, theirs)]
            results[impl]["common_prefix_with_paged_sdpa"] = prefixes
            # The chosen tokens' log-probabilities where both chose the same tokens: a wrong attention shows
            # there at once, a bf16 tie does not
            diffs = [
                abs(a - b) for n, ours, ref in zip(prefixes, logprobs[impl], logprobs["paged|sdpa"])
                for a, b in zip(ours[:n], ref[:n])
            ]  # fmt: skip
            results[impl]["logprob_max_abs_diff_on_common_prefix"] = max(diffs, default=None)
    if "paged|sdpa" in outputs:
        results["teacher_forced_on_paged_sdpa_tokens"] = teacher_forced(model, prompts, outputs["paged|sdpa"])
    return results


def teacher_forced(model, prompts: list[list[int]], generated: list[list[int]]) -> dict:
    """Whether each implementation picks ``generated``'s tokens (paged|sdpa's) when fed the same prefix.

    Greedy outputs of two bf16 implementations part at the first near-tie and never meet again, so
    comparing them token for token measures the ties, not the attention. Here every position gets the
    same prefix (prompt + the reference's tokens so far, one left-padded forward per implementation), and
    each disagreement is reported with the reference-side top-2 margin next to the two implementations'
    logit difference: a margin under that difference is a tie that rounding decides."""
    device = next(model.parameters()).device
    n_new = min(map(len, generated))
    seqs = [p + g[:n_new] for p, g in zip(prompts, generated)]
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq) :] = torch.tensor(seq)
        mask[row, width - len(seq) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    expected = torch.tensor([g[:n_new] for g in generated], device=device)
    position_ids = (mask.cumsum(-1) - 1).masked_fill_(mask == 0, 1)
    logits = {}
    with torch.inference_mode():
        for impl in ("sdpa", "attn_dispatch"):
            model.set_attn_implementation(impl)
            # the last n_new + 1 positions: the prompt's last token predicts the first generated one, ...
            out = model(ids, attention_mask=mask, position_ids=position_ids, logits_to_keep=n_new + 1)
            logits[impl] = out.logits[:, :n_new].float()
    report = {"positions": expected.numel()}
    for impl, lg in logits.items():
        report[f"{impl}_picks_paged_sdpa_token"] = int((lg.argmax(-1) == expected).sum())
    ours, ref = logits["attn_dispatch"], logits["sdpa"]
    differ = (ours.argmax(-1) != ref.argmax(-1)).nonzero().tolist()
    ties = []
    for row, pos in differ:
        top = ref[row, pos].topk(2).values
        ties.append(dict(row=row, position=pos, sdpa_margin=(top[0] - top[1]).item(),
                         logits_max_abs_diff=(ours[row, pos] - ref[row, pos]).abs().max().item()))  # fmt: skip
    report["attn_dispatch_vs_sdpa_same_argmax"] = expected.numel() - len(differ)
    report["attn_dispatch_vs_sdpa_disagreements"] = ties
    report["every_disagreement_a_tie"] = all(t["sdpa_margin"] <= t["logits_max_abs_diff"] for t in ties)
    report["logits_max_abs_diff"] = (ours - ref).abs().max().item()
    return report


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def kernel_check(device: str) -> list[str]:
    """The Llama batch's attention shapes through ``ops`` against the fp32 torch reference (the conformance
    suite's yardstick): the prefill (8 sequences, 32/8 heads of 64, causal) and one decode step."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "cuda_fa3" / "tests"))
    import attn_dispatch
    import conformance_grid as cg
    from attn_dispatch import AttentionParams

    ops, lines = attn_dispatch.load(device), []
    causal = (AttentionParams(causal=True),)
    for label, q_lens, k_lens in (("prefill", PROMPT_LENS, PROMPT_LENS), ("decode", [1] * 8, [n + 1 for n in PROMPT_LENS])):
        pages = len(k_lens) * -(-max(k_lens) // 16) + 4
        case = cg.Case(f"llama-{label}", tuple(q_lens), tuple(k_lens), 32, 8, 64, 16, pages, torch.bfloat16, causal, False, 0)
        with torch.inference_mode():
            lines += [("ok   " if o.ok else "WRONG ") + o.line() for o in cg.run_case(ops, case, device)]
    print("\n".join(lines))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="llama,gemma2")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", default=None)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny configs (a CPU smoke test of this script)")
    parser.add_argument("--paged-only", action="store_true", help="only generate_batch (Llama)")
    parser.add_argument("--paged-graphs", action="store_true", help="with --paged-only: CUDA graphs forced on too")
    parser.add_argument("--generate-rounds", type=int, default=7, help="interleaved generate timings (median kept)")
    args = parser.parse_args()
    ops = ad_transformers.ops_for(torch.device(args.device))
    print(f"attn_dispatch ops on cuda: {ops}")
    if args.paged_only:
        torch.manual_seed(0)
        config = tiny(llama_config()) if args.tiny else llama_config()
        with torch.device(args.device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
        ids, mask = padded_batch(model.config.vocab_size, args.device)
        report = {"eager": bench_paged(model.eval(), ids, mask)}
        if args.paged_graphs:
            report["cuda_graphs"] = bench_paged(model, ids, mask, graphs=True)
        print(json.dumps(report, indent=1))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
        return
    report = {"kernel_check": kernel_check(args.device)} if args.device == "cuda" else {}
    for name in args.models.split(","):
        rows = bench_model(name, args.new_tokens, args.rounds, args.device, args.tiny, args.generate_rounds)
        report[name] = rows
        print(f"\n## {name}")
        print(json.dumps(rows, indent=1))
    print(f"\nmetadata stats: {ad_transformers.stats}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
