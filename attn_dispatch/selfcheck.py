"""Run every resolved operation against its original-path reference on random inputs, on this device.

Where an operation resolved to the reference itself the check still runs (it proves the reference is
callable here) and the table says so. Same-kernel paths must match exactly; kernel changes (FA3 vs the
torch reference) must match within FlashAttention's bf16 tolerance. Every op a plugin provides must also
refuse the op's bad-input cases (``attn_dispatch.bad_inputs``) as the reference does: a ValueError
naming the same argument, with nothing written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import reference
from .bad_inputs import CASES, NotApplicable, expect_refused, make_padded_plan
from .ops import OP_NAMES, Ops
from .plans import DEFAULT_PARAMS, AttentionParams

# bf16 FlashAttention vs a float32-accumulating reference (the seed PRs' tolerance).
ATOL, RTOL = 5e-2, 1e-2


@dataclass(frozen=True)
class CheckResult:
    op: str
    implementation: str
    case: str
    max_abs_err: float
    passed: bool
    detail: str = ""


def run(ops: Ops, seed: int = 0) -> list[CheckResult]:
    device = _device(ops)
    results = []
    for check in CHECKS:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        try:
            results.extend(check(ops, device, generator))
        except Exception as exc:  # a self-check reports, it does not crash
            results.append(CheckResult(check.__name__.removeprefix("_check_"), "?", "-", float("nan"), False, f"{type(exc).__name__}: {exc}"))
    return results


def note(ops: Ops) -> str:
    """What the check proved, when that is less than it seems: with every op on the reference (a CPU),
    each check compared the reference with itself."""
    if all(res.plugin == "reference" for res in ops.resolutions.values()):
        return (
            f"note: no plugin is active on {ops.hardware}, so every check compared the reference with itself: "
            "this shows the original path runs here, not that any plugin is correct (run it on the target GPU)"
        )
    return ""


def format_table(results: list[CheckResult]) -> str:
    rows = [("op", "implementation", "case", "max |err|", "result")]
    for r in results:
        verdict = "ok" if r.passed else "FAIL"
        if r.detail:
            verdict += f" ({r.detail})"
        rows.append((r.op, r.implementation, r.case, f"{r.max_abs_err:.2e}", verdict))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _device(ops: Ops) -> torch.device:
    if ops.hardware.index is not None and torch.cuda.is_available():
        return torch.device("cuda", ops.hardware.index)
    return torch.device("cpu")  # the CPU, or an arch simulated with ATTN_DISPATCH_ARCH on a machine without one


def _rand(generator: torch.Generator, *shape: int, dtype=torch.bfloat16, device) -> torch.Tensor:
    return torch.randn(*shape, generator=generator).to(dtype=dtype, device=device)


def _compare(ops: Ops, op: str, case: str, got: torch.Tensor, want: torch.Tensor, exact: bool) -> CheckResult:
    res = ops.resolutions[op]
    impl = res.plugin if res.plugin != "reference" else "reference (no plugin here)"
    err = (got.float() - want.float()).abs().max().item() if got.numel() else 0.0
    if exact or res.plugin == "reference":
        passed = torch.equal(got, want)
        detail = "bytes equal" if passed else "bytes differ"
    else:
        passed, detail = torch.allclose(got.float(), want.float(), atol=ATOL, rtol=RTOL), f"atol {ATOL}"
    return CheckResult(op, impl, case, err, passed and not got.isnan().any().item(), detail)


def _check_attention(ops: Ops, device, g) -> list[CheckResult]:
    heads, kv_heads, head_dim, page_size = 4, 2, 64, 16
    q_lens = torch.tensor([1, 3, 1], dtype=torch.int32)  # a mixed batch: decode, extend, decode
    cache_seqlens = torch.tensor([37, 20, 5], dtype=torch.int32)
    pages_per_seq = 3
    batch = q_lens.shape[0]
    k_cache = _rand(g, batch * pages_per_seq, page_size, kv_heads, head_dim, device=device)
    v_cache = _rand(g, batch * pages_per_seq, page_size, kv_heads, head_dim, device=device)
    page_table = torch.randperm(batch * pages_per_seq, generator=g).to(torch.int32).view(batch, pages_per_seq)
    cu_seqlens_q = torch.cat([torch.zeros(1, dtype=torch.int32), q_lens.cumsum(0).to(torch.int32)])
    tokens = int(cu_seqlens_q[-1])
    q = _rand(g, tokens, heads, head_dim, device=device)
    window = AttentionParams(window_size=(8, 0))
    plan_args = dict(
        cache_seqlens=cache_seqlens.to(device), page_table=page_table.to(device), cu_seqlens_q=cu_seqlens_q.to(device),
        max_seqlen_q=int(q_lens.max()), max_seqlen_k=int(cache_seqlens.max()), page_size=page_size,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, dtype=q.dtype, layer_params=(DEFAULT_PARAMS, window),
    )  # fmt: skip
    plan, ref_plan = ops.make_attention_plan(**plan_args), reference.make_attention_plan(**plan_args)
    results = []
    for params in (DEFAULT_PARAMS, window):
        out = torch.full((tokens + 2, heads * head_dim), 7.0, dtype=q.dtype, device=device)  # padded, poisoned
        want = torch.full_like(out, 7.0)
        ops.paged_attention_out(q, k_cache, v_cache, out, plan=plan, params=params)
        reference.paged_attention_out(q, k_cache, v_cache, want, plan=ref_plan, params=params)
        case = f"paged mixed, window {params.window_size}"
        results.append(_compare(ops, "paged_attention_out", case, out, want, exact=False))
    q_paged = q

    seq_lens = torch.tensor([5, 9], dtype=torch.int32)
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), seq_lens.cumsum(0).to(torch.int32)]).to(device)
    total = int(seq_lens.sum())
    q, k, v = (_rand(g, total, h, head_dim, device=device) for h in (heads, kv_heads, kv_heads))
    out, want = (torch.empty(total, heads, head_dim, dtype=q.dtype, device=device) for _ in range(2))
    varlen_args = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=9, max_seqlen_k=9)
    ops.varlen_attention_out(q, k, v, out, **varlen_args)
    reference.varlen_attention_out(q, k, v, want, **varlen_args)
    results.append(_compare(ops, "varlen_attention_out", "varlen causal prefill", out, want, exact=False))

    # bind_attention: a paged plan's run and a packed plan's run (metadata made once) against the reference
    out = torch.full((q_paged.shape[0], heads, head_dim), 7.0, dtype=q.dtype, device=device)
    want = torch.full_like(out, 7.0)
    ops.bind_attention(plan, params=window)(q_paged, k_cache, v_cache, out)
    reference.bind_attention(ref_plan, params=window)(q_paged, k_cache, v_cache, want)
    results.append(_compare(ops, "bind_attention", "paged plan's run, window (8, 0)", out, want, exact=False))
    packed_args = dict(varlen_args, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, dtype=q.dtype)
    out, want = (torch.empty(total, heads, head_dim, dtype=q.dtype, device=device) for _ in range(2))
    ops.bind_attention(ops.make_attention_plan(**packed_args))(q, k, v, out)
    reference.bind_attention(reference.make_attention_plan(**packed_args))(q, k, v, want)
    results.append(_compare(ops, "bind_attention", "packed plan's run, causal prefill", out, want, exact=False))
    return results


def _check_padded_run(ops: Ops, device, g) -> list[CheckResult]:
    """bind_attention's run over a padded plan, against the reference: a left-padded batch read in place
    through transformers' layout (``[B, H, S, D]`` tensors transposed, ``out`` too). A check of its own, so
    an implementation that refuses padded plans fails this row alone, not the paged and packed ones."""
    heads, kv_heads, head_dim = 4, 2, 64
    window = AttentionParams(window_size=(8, 0))
    results = []
    # (case, S_q, S_k, key_starts, key ends, params): decode over a StaticCache-like buffer longer than any
    # row's keys; prefill with left padding, whose pad queries see no key (zeros: every out row is written)
    batches = (
        ("padded decode, StaticCache-like, window (8, 0)", 1, 24, [5, 0, 11], [20, 24, 17], window),
        ("padded prefill, left-padded, causal", 16, 16, [0, 6, 15], [16, 16, 16], DEFAULT_PARAMS),
    )
    for case, s_q, s_k, starts, ends, params in batches:
        batch = len(starts)
        q = _rand(g, batch, heads, s_q, head_dim, device=device).transpose(1, 2)
        k, v = (_rand(g, batch, kv_heads, s_k, head_dim, device=device).transpose(1, 2) for _ in range(2))
        plan_args = dict(
            cache_seqlens=torch.tensor(ends, dtype=torch.int32, device=device),
            key_starts=torch.tensor(starts, dtype=torch.int32, device=device), max_seqlen_q=s_q, max_seqlen_k=s_k,
            num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, dtype=q.dtype, layer_params=(DEFAULT_PARAMS, window),
        )  # fmt: skip
        # poisoned, so a row the run leaves unwritten differs from the reference's
        out, want = (torch.full((batch, heads, s_q, head_dim), 7.0, dtype=q.dtype, device=device) for _ in range(2))
        try:
            plan = make_padded_plan({"make_attention_plan": ops.make_attention_plan}, **plan_args)
        except NotApplicable as exc:  # padded plans are optional (FA4 makes none): say so, do not fail
            return [CheckResult("bind_attention", ops.resolutions["bind_attention"].plugin, "padded plans", 0.0, True, f"not offered: {exc}")]
        ops.bind_attention(plan, params=params)(q, k, v, out.transpose(1, 2))
        reference.bind_attention(reference.make_attention_plan(**plan_args), params=params)(q, k, v, want.transpose(1, 2))
        results.append(_compare(ops, "bind_attention", case, out, want, exact=False))
    return results


def _check_mla_v_up_proj(ops: Ops, device, g) -> list[CheckResult]:
    batch, heads, kv_lora_rank, v_dim = 5, 4, 512, 128
    attn_output = _rand(g, batch, heads, kv_lora_rank, device=device)
    w_vc = _rand(g, heads, kv_lora_rank, v_dim, device=device) * 0.05
    got = ops.mla_v_up_proj(attn_output, w_vc)
    want = reference.mla_v_up_proj(attn_output, w_vc)
    return [_compare(ops, "mla_v_up_proj", "bf16 w_vc, bf16 o_proj", got, want, exact=True)]


def _check_mla_decode_query(ops: Ops, device, g) -> list[CheckResult]:
    tokens, heads, kv_lora_rank, rope_dim = 3, 4, 512, 64
    q_nope = _rand(g, tokens, heads, kv_lora_rank, device=device)
    q_rope = _rand(g, tokens, heads, rope_dim, device=device)
    want = torch.cat([q_nope, q_rope], dim=-1)
    results = []
    for impl in ("aiter", "flashmla"):
        for given, q, rope in (("split", q_nope.clone(), q_rope.clone()), ("q_cat", want.clone(), None)):
            q, rope = ops.mla_query_for_backend(q, rope, is_decode=True, decode_impl=impl, kv_lora_rank=kv_lora_rank)
            q_all, _, _ = ops.mla_decode_query(q, rope, num_heads=heads, kv_lora_rank=kv_lora_rank, decode_impl=impl)
            results.append(_compare(ops, "mla_decode_query", f"decode {given}, {impl} impl", q_all, want, exact=True))
    return results


def _check_masked_attention(ops: Ops, device, g) -> list[CheckResult]:
    batch, seq, heads, head_dim = 2, 48, 2, 64
    lengths = torch.tensor([48, 30])
    key_mask = (torch.arange(seq)[None, :] < lengths[:, None]).to(device)
    q, k, v = (_rand(g, batch, seq, heads, head_dim, device=device) for _ in range(3))
    got = ops.masked_attention(q, k, v, ops.build_mask_meta(key_mask))
    want = reference.masked_attention(q, k, v, reference.build_mask_meta(key_mask))
    results = [_compare(ops, "masked_attention", "right-padded keys", got, want, exact=False)]
    # Cross attention (S_q != S_k, the mask over the keys) with GQA (one kv head for both q heads).
    q = _rand(g, batch, 20, heads, head_dim, device=device)
    k, v = (_rand(g, batch, seq, 1, head_dim, device=device) for _ in range(2))
    got = ops.masked_attention(q, k, v, ops.build_mask_meta(key_mask))
    want = reference.masked_attention(q, k, v, reference.build_mask_meta(key_mask))
    results.append(_compare(ops, "masked_attention", "cross attention, GQA", got, want, exact=False))
    return results


def _check_contracts(ops: Ops, device, g) -> list[CheckResult]:
    """Each plugin-provided op against the op's bad-input cases, on this device (the reference's own
    refusals are tested on CPU by the test suite)."""
    implementations = {op: getattr(ops, op) for op in OP_NAMES}
    originals = {op: getattr(reference, op) for op in OP_NAMES}
    results = []
    for op in OP_NAMES:
        plugin = ops.resolutions[op].plugin
        if plugin == "reference":
            continue
        cases = [case for case in CASES if case.op == op]
        wrong, reworded, skipped = [], 0, 0
        for case in cases:
            try:  # a case that cannot even be built (the plugin's plan refuses the valid call) is one wrong row
                message = expect_refused(implementations, case, device, torch.bfloat16)
                reworded += message != expect_refused(originals, case, device, torch.bfloat16)
            except NotApplicable:  # an optional kind of plan the plugin does not make (padded plans on FA4)
                skipped += 1
            except Exception as exc:  # AssertionError: refused wrongly; anything else: raised while building
                wrong.append(f"{case.id}: {type(exc).__name__}: {exc}".splitlines()[0])
        detail = f"{len(cases) - len(wrong) - skipped}/{len(cases) - skipped} refused naming the argument"
        if skipped:
            detail += f" ({skipped} not applicable: no padded plans)"
        if reworded:
            detail += f", {reworded} with other wording than the reference"
        if wrong:
            detail += f"; first: {wrong[0]}"
        results.append(CheckResult(op, plugin, "bad input refused", 0.0, not wrong, detail))
    return results


CHECKS: tuple[Callable, ...] = (
    _check_attention, _check_padded_run, _check_mla_v_up_proj, _check_mla_decode_query, _check_masked_attention, _check_contracts,
)
