"""Bad-input cases for every op, to run against any implementation (the reference, a plugin, on any device).

Each case changes one argument of a valid call and names the argument the ``ValueError`` must start with.
:func:`expect_refused` runs one and checks that the error names it and that no tensor argument (``out``
above all) was written. The host's ``tests/test_contracts.py`` runs them on the CPU references; a
plugin's GPU suite runs the same cases on its own ops, so engine code refused on the H200 is refused on
a laptop too, with the same message.

Cases are built from the implementation's own ``make_attention_plan`` / ``build_mask_meta`` (a plan is
the implementation's), on ``device`` in ``dtype`` (float16 or bfloat16: what every kernel takes).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from .plans import AttentionParams, MaskMeta

Build = Callable[[Mapping[str, Callable], torch.device, torch.dtype], tuple[tuple, dict]]
SLIDING = AttentionParams(window_size=(2, 0))


@dataclass(frozen=True)
class BadInput:
    id: str
    op: str
    arg: str  # the argument the ValueError must name first
    build: Build  # (ops, device, dtype) -> (args, kwargs) of the call


class NotApplicable(Exception):
    """The implementation does not offer what the case exercises: it refuses padded plans, which are
    optional (``make_attention_plan(key_starts=...)`` raising ValueError naming ``key_starts``: FA4)."""


def expect_refused(ops: Mapping[str, Callable], case: BadInput, device="cpu", dtype=torch.bfloat16) -> str:
    """Run ``case`` against ``ops[case.op]``: it must raise ValueError("<arg>: ...") and write nothing.
    :class:`NotApplicable` when the case's valid call cannot be made (an optional kind of plan refused)."""
    args, kwargs = case.build(ops, torch.device(device), dtype)
    run_with = kwargs.pop("run_with", None)  # bind_attention's cases: the bound run is called with these
    tensors = [t for t in (*args, *kwargs.values(), *(run_with or ())) if isinstance(t, torch.Tensor)]
    before = [t.clone() for t in tensors]
    try:
        result = ops[case.op](*args, **kwargs)
        if run_with is not None:
            result(*run_with)
    except ValueError as exc:
        message = str(exc)
    except Exception as exc:  # the wrong kind of error: a reshape or kernel error, an AttributeError, ...
        raise AssertionError(f"{case.id}: raised {type(exc).__name__}: {exc}; expected ValueError naming {case.arg}") from exc
    else:
        raise AssertionError(f"{case.id}: {case.op} accepted the input; expected ValueError naming {case.arg}")
    if not message.startswith(f"{case.arg}:"):
        raise AssertionError(f"{case.id}: expected a ValueError starting with {case.arg!r}, got {message!r}")
    for i, (t, b) in enumerate(zip(tensors, before)):
        if not torch.equal(t, b):
            raise AssertionError(f"{case.id}: tensor argument {i} was written before the error")
    return message


def _op(op: str, positional: tuple[str, ...], valid: Callable) -> Callable[..., BadInput]:
    """The case maker for ``op``: ``valid(rand, device, dtype, ops)`` returns a valid call as keywords
    (``positional`` are passed by position); each case replaces some of them (values, or ``f(rand, device)``
    builders) and names the argument to blame."""

    def case(id: str, arg: str, **change) -> BadInput:
        def build(ops, device, dtype):
            rand = lambda *shape, dt=dtype: torch.randn(*shape, device=device).to(dt)  # noqa: E731
            call = valid(rand, device, dtype, ops) | {k: v(rand, device) if callable(v) else v for k, v in change.items()}
            return tuple(call.pop(name) for name in positional), call

        return BadInput(id, op, arg, build)

    return case


# Valid calls. Paged: 3 sequences (decode, extend, decode), page_size 4, 4 pages each; 4 q / 2 kv heads, d 8.
def _plan_kwargs(rand, device, dtype, ops) -> dict:
    i32 = dict(dtype=torch.int32, device=device)
    return dict(
        cache_seqlens=torch.tensor([9, 4, 13], **i32), page_table=torch.arange(12, **i32).view(3, 4),
        cu_seqlens_q=torch.tensor([0, 1, 4, 5], **i32), max_seqlen_q=3, max_seqlen_k=13, page_size=4,
        num_heads=4, num_kv_heads=2, head_dim=8, dtype=dtype, layer_params=(AttentionParams(),),
    )  # fmt: skip


def _paged_call(rand, device, dtype, ops) -> dict:
    plan = ops["make_attention_plan"](**_plan_kwargs(rand, device, dtype, ops))  # the implementation's own plan
    return dict(q=rand(5, 4, 8), k_cache=rand(12, 4, 2, 8), v_cache=rand(12, 4, 2, 8), out=rand(7, 32), plan=plan)


def _varlen_call(rand, device, dtype, ops) -> dict:
    cu = torch.tensor([0, 3, 10], dtype=torch.int32, device=device)
    return dict(
        q=rand(10, 4, 8), k=rand(10, 2, 8), v=rand(10, 2, 8), out=rand(12, 4, 8),
        cu_seqlens_q=cu, cu_seqlens_k=cu.clone(), max_seqlen_q=7, max_seqlen_k=7,
    )  # fmt: skip


def _packed_plan_kwargs(rand, device, dtype, ops) -> dict:
    """A packed plan over ``_varlen_call``'s batch (2 sequences of 3 and 7 tokens)."""
    cu = torch.tensor([0, 3, 10], dtype=torch.int32, device=device)
    return dict(
        cu_seqlens_q=cu, cu_seqlens_k=cu.clone(), max_seqlen_q=7, max_seqlen_k=7, num_heads=4, num_kv_heads=2,
        head_dim=8, dtype=dtype,
    )  # fmt: skip


def _padded_plan_kwargs(rand, device, dtype, ops) -> dict:
    """A padded plan: 2 rows of a left-padded batch, 3 queries each over a 6-slot key buffer (row 0's keys
    are slots 2:6, row 1's 0:5: a buffer longer than its keys, as a StaticCache's)."""
    i32 = dict(dtype=torch.int32, device=device)
    return dict(
        cache_seqlens=torch.tensor([6, 5], **i32), key_starts=torch.tensor([2, 0], **i32), max_seqlen_q=3,
        max_seqlen_k=6, num_heads=4, num_kv_heads=2, head_dim=8, dtype=dtype,
    )  # fmt: skip


def _padded_run_with(rand) -> tuple:
    """A valid call of a padded plan's run: q/k/v/out ``[B, S, heads, d]``."""
    return rand(2, 3, 4, 8), rand(2, 6, 2, 8), rand(2, 6, 2, 8), rand(2, 3, 4, 8)


def _bind_call(rand, device, dtype, ops, kind: str = "paged") -> dict:
    """``bind_attention(plan)`` and a valid call of its run (``run_with``: q, k, v, out)."""
    if kind == "packed":
        plan = ops["make_attention_plan"](**_packed_plan_kwargs(rand, device, dtype, ops))
        run_with = (rand(10, 4, 8), rand(10, 2, 8), rand(10, 2, 8), rand(12, 4, 8))
    elif kind == "padded":
        plan = make_padded_plan(ops, **_padded_plan_kwargs(rand, device, dtype, ops))
        run_with = _padded_run_with(rand)
    else:
        call = _paged_call(rand, device, dtype, ops)
        plan, run_with = call["plan"], (call["q"], call["k_cache"], call["v_cache"], call["out"])
    return dict(plan=plan, run_with=run_with)


def make_padded_plan(ops: Mapping[str, Callable], **kwargs):
    """``ops["make_attention_plan"](**kwargs)`` for a valid padded batch; :class:`NotApplicable` when the
    implementation refuses padded plans by naming ``key_starts`` (they are optional)."""
    try:
        return ops["make_attention_plan"](**kwargs)
    except ValueError as exc:
        if str(exc).startswith("key_starts:"):
            raise NotApplicable(str(exc)) from exc
        raise


def _run_case(kind: str):
    """Cases of a bound run: ``q``/``k``/``v``/``out`` replace the run's tensors (the error names them)."""
    names = ("q", "k", "v", "out")

    def case(id: str, arg: str, **change) -> BadInput:
        def build(ops, device, dtype):
            rand = lambda *shape, dt=dtype: torch.randn(*shape, device=device).to(dt)  # noqa: E731
            call = _bind_call(rand, device, dtype, ops, kind)
            run_with = dict(zip(names, call.pop("run_with")))
            for name, value in change.items():
                value = value(rand, device) if callable(value) else value
                (run_with if name in names else call)[name] = value
            plan = call.pop("plan")
            return (plan,), {**call, "run_with": tuple(run_with[n] for n in names)}

        return BadInput(id, "bind_attention", arg, build)

    return case


def _reference_plan(kind: str, device):
    """A reference plan (bf16) of ``kind``, for cases that hand a plan to a call it does not fit (every
    implementation's validator reads only the plan's fields, so the reference's plan serves them all)."""
    from .reference import make_attention_plan

    kwargs = {"packed": _packed_plan_kwargs, "padded": _padded_plan_kwargs, "paged": _plan_kwargs}[kind]
    return make_attention_plan(**kwargs(None, device, torch.bfloat16, None))


def _masked_call(rand, device, dtype, ops) -> dict:
    """Self attention with equal heads (what every fast path takes), the second row's last 3 keys masked."""
    key_mask = torch.arange(12, device=device)[None, :] < torch.tensor([[12], [9]], device=device)
    return dict(q=rand(2, 12, 4, 8), k=rand(2, 12, 4, 8), v=rand(2, 12, 4, 8), mask_meta=ops["build_mask_meta"](key_mask))


_plan_case = _op("make_attention_plan", (), _plan_kwargs)
_paged_case = _op("paged_attention_out", ("q", "k_cache", "v_cache", "out"), _paged_call)
_varlen_case = _op("varlen_attention_out", ("q", "k", "v", "out"), _varlen_call)
_packed_plan_case = _op("make_attention_plan", (), _packed_plan_kwargs)
_bind_case = _op("bind_attention", ("plan",), lambda rand, d, dtype, ops: {k: v for k, v in _bind_call(rand, d, dtype, ops).items() if k != "run_with"})
_bind_padded_case = _op("bind_attention", ("plan",), lambda rand, d, dtype, ops: {k: v for k, v in _bind_call(rand, d, dtype, ops, "padded").items() if k != "run_with"})
_padded_plan_case = _op("make_attention_plan", (), _padded_plan_kwargs)
_paged_run, _packed_run, _padded_run = _run_case("paged"), _run_case("packed"), _run_case("padded")
_v_up = _op("mla_v_up_proj", ("attn_output", "w_vc"), lambda rand, d, dtype, ops: dict(attn_output=rand(5, 4, 32), w_vc=rand(4, 32, 16)))
_for_backend = _op(
    "mla_query_for_backend", ("q", "q_rope"),
    lambda rand, d, dtype, ops: dict(q=rand(3, 4, 40), q_rope=None, is_decode=True, decode_impl="aiter", kv_lora_rank=32),
)  # fmt: skip
_decode = _op(
    "mla_decode_query", ("q", "q_rope"),
    lambda rand, d, dtype, ops: dict(q=rand(3, 4, 40), q_rope=None, num_heads=4, kv_lora_rank=32, decode_impl="aiter"),
)  # fmt: skip
_mask = _op("build_mask_meta", ("key_mask",), lambda rand, d, dtype, ops: dict(key_mask=torch.ones(2, 12, dtype=torch.bool, device=d)))
_masked = _op("masked_attention", ("q", "k", "v", "mask_meta"), _masked_call)


CASES: tuple[BadInput, ...] = (
    # make_attention_plan
    _plan_case("plan num_heads=0", "num_heads", num_heads=0),
    _plan_case("plan num_kv_heads=0", "num_kv_heads", num_kv_heads=0),
    _plan_case("plan heads not divisible", "num_heads", num_kv_heads=3),
    _plan_case("plan num_heads float", "num_heads", num_heads=4.0),
    _plan_case("plan num_heads bool", "num_heads", num_heads=True),
    _plan_case("plan head_dim=0", "head_dim", head_dim=0),
    _plan_case("plan head_dim_v<0", "head_dim_v", head_dim_v=-8),
    _plan_case("plan max_seqlen_q=0", "max_seqlen_q", max_seqlen_q=0),
    _plan_case("plan max_seqlen_k=0", "max_seqlen_k", max_seqlen_k=0),
    _plan_case("plan max_seqlen_k beyond the page table", "max_seqlen_k", max_seqlen_k=17),
    _plan_case("plan page_size=0", "page_size", page_size=0),
    _plan_case("plan dtype as a string", "dtype", dtype="bf16"),
    _plan_case("plan int dtype", "dtype", dtype=torch.int32),
    _plan_case("plan empty layer_params", "layer_params", layer_params=()),
    _plan_case("plan layer_params not params", "layer_params", layer_params=("causal",)),
    _plan_case("plan static_plan wrong type", "static_plan", static_plan="plan"),
    _plan_case("plan int64 cache_seqlens", "cache_seqlens", cache_seqlens=lambda rand, d: torch.tensor([9, 4, 13], device=d)),
    _plan_case("plan page_table rows", "page_table", page_table=lambda rand, d: torch.zeros(2, 4, dtype=torch.int32, device=d)),
    _plan_case("plan cu_seqlens_q length", "cu_seqlens_q", cu_seqlens_q=lambda rand, d: torch.tensor([0, 1, 4], dtype=torch.int32, device=d)),
    _packed_plan_case("packed plan with a page table", "page_table", page_table=lambda rand, d: torch.zeros(2, 4, dtype=torch.int32, device=d)),
    _packed_plan_case("packed plan with page_size", "page_size", page_size=4),
    _packed_plan_case("packed plan cu_seqlens_k length", "cu_seqlens_k", cu_seqlens_k=lambda rand, d: torch.tensor([0, 10], dtype=torch.int32, device=d)),
    _packed_plan_case("packed plan int64 cu_seqlens_k", "cu_seqlens_k", cu_seqlens_k=lambda rand, d: torch.tensor([0, 3, 10], device=d)),
    _plan_case("paged plan without page_size", "page_size", page_size=None),
    # make_attention_plan, padded: a plan is one kind, so each other kind's arguments are refused by name
    _padded_plan_case("padded plan with cu_seqlens_k", "key_starts", cu_seqlens_k=lambda rand, d: torch.tensor([0, 3, 6], dtype=torch.int32, device=d)),
    _padded_plan_case("padded plan with a page table", "page_table", page_table=lambda rand, d: torch.zeros(2, 2, dtype=torch.int32, device=d)),
    _padded_plan_case("padded plan with page_size", "page_size", page_size=4),
    _padded_plan_case("padded plan with cu_seqlens_q", "cu_seqlens_q", cu_seqlens_q=lambda rand, d: torch.tensor([0, 3, 6], dtype=torch.int32, device=d)),
    _padded_plan_case("padded plan with static_plan", "static_plan", static_plan=lambda rand, d: _reference_plan("paged", d)),
    _padded_plan_case("padded plan without cache_seqlens", "cache_seqlens", cache_seqlens=None),
    _padded_plan_case("padded plan int64 cache_seqlens", "cache_seqlens", cache_seqlens=lambda rand, d: torch.tensor([6, 5], device=d)),
    _padded_plan_case("padded plan int64 key_starts", "key_starts", key_starts=lambda rand, d: torch.tensor([2, 0], device=d)),
    _padded_plan_case("padded plan key_starts length", "key_starts", key_starts=lambda rand, d: torch.tensor([2, 0, 1], dtype=torch.int32, device=d)),
    _padded_plan_case("padded plan key_starts 2-D", "key_starts", key_starts=lambda rand, d: torch.tensor([[2, 0]], dtype=torch.int32, device=d)),
    _padded_plan_case("padded plan key_starts not contiguous", "key_starts", key_starts=lambda rand, d: torch.tensor([2, 9, 0, 9], dtype=torch.int32, device=d)[::2]),
    _padded_plan_case("padded plan empty batch", "cache_seqlens", cache_seqlens=lambda rand, d: torch.zeros(0, dtype=torch.int32, device=d), key_starts=lambda rand, d: torch.zeros(0, dtype=torch.int32, device=d)),
    _padded_plan_case("padded plan max_seqlen_q=0", "max_seqlen_q", max_seqlen_q=0),
    # paged_attention_out
    _paged_case("paged with a packed plan", "plan", plan=lambda rand, d: _reference_plan("packed", d)),
    _paged_case("paged with a padded plan", "plan", plan=lambda rand, d: _reference_plan("padded", d)),
    _paged_case("paged params not planned", "params", params=SLIDING),
    _paged_case("paged params wrong type", "params", params="causal"),
    _paged_case("paged plan wrong type", "plan", plan={"num_heads": 4}),
    _paged_case("paged plan None", "plan", plan=None),
    _paged_case("paged q dtype differs from the plan", "q", q=lambda rand, d: rand(5, 4, 8, dt=torch.float32)),
    _paged_case("paged int q", "q", q=lambda rand, d: torch.ones(5, 4, 8, dtype=torch.int64, device=d)),
    _paged_case("paged q rank 2", "q", q=lambda rand, d: rand(5, 32)),
    _paged_case("paged q rank 4", "q", q=lambda rand, d: rand(1, 5, 4, 8)),
    _paged_case("paged q heads", "q", q=lambda rand, d: rand(5, 2, 8)),
    _paged_case("paged q head_dim", "q", q=lambda rand, d: rand(5, 4, 16)),
    _paged_case("paged q not tensor", "q", q=[[0.0]]),
    _paged_case("paged k_cache page size", "k_cache", k_cache=lambda rand, d: rand(6, 8, 2, 8)),
    _paged_case("paged k_cache kv heads", "k_cache", k_cache=lambda rand, d: rand(12, 4, 1, 8)),
    _paged_case("paged k_cache head_dim", "k_cache", k_cache=lambda rand, d: rand(12, 4, 2, 4)),
    _paged_case("paged k_cache rank", "k_cache", k_cache=lambda rand, d: rand(48, 2, 8)),
    _paged_case("paged v_cache head_dim", "v_cache", v_cache=lambda rand, d: rand(12, 4, 2, 4)),
    _paged_case("paged v_cache pages", "v_cache", v_cache=lambda rand, d: rand(11, 4, 2, 8)),
    _paged_case("paged out width", "out", out=lambda rand, d: rand(7, 33)),
    _paged_case("paged out rows", "out", out=lambda rand, d: rand(4, 32)),
    _paged_case("paged out dtype", "out", out=lambda rand, d: rand(7, 32, dt=torch.float32)),
    _paged_case("paged out not contiguous", "out", out=lambda rand, d: rand(32, 7).t()),
    _paged_case("paged softmax_scale string", "softmax_scale", softmax_scale="0.1"),
    # varlen_attention_out
    _varlen_case("varlen int q", "q", q=lambda rand, d: torch.ones(10, 4, 8, dtype=torch.int32, device=d)),
    _varlen_case("varlen q rank", "q", q=lambda rand, d: rand(10, 32)),
    _varlen_case("varlen heads not a multiple", "q", k=lambda rand, d: rand(10, 3, 8), v=lambda rand, d: rand(10, 3, 8)),
    _varlen_case("varlen q heads fewer than k", "q", q=lambda rand, d: rand(10, 1, 8)),
    _varlen_case("varlen k head_dim", "k", k=lambda rand, d: rand(10, 2, 16)),
    _varlen_case("varlen k dtype", "k", k=lambda rand, d: rand(10, 2, 8, dt=torch.float32)),
    _varlen_case("varlen v tokens differ from k", "v", v=lambda rand, d: rand(9, 2, 8)),
    _varlen_case("varlen v heads differ from k", "v", v=lambda rand, d: rand(10, 1, 8)),
    _varlen_case("varlen v head_dim 0", "v", v=lambda rand, d: rand(10, 2, 0)),
    _varlen_case("varlen cu_seqlens_q int64", "cu_seqlens_q", cu_seqlens_q=lambda rand, d: torch.tensor([0, 3, 10], device=d)),
    _varlen_case("varlen cu_seqlens_k length", "cu_seqlens_k", cu_seqlens_k=lambda rand, d: torch.tensor([0, 10], dtype=torch.int32, device=d)),
    _varlen_case("varlen max_seqlen_q=0", "max_seqlen_q", max_seqlen_q=0),
    _varlen_case("varlen max_seqlen_k<0", "max_seqlen_k", max_seqlen_k=-1),
    _varlen_case("varlen params wrong type", "params", params=(True, (-1, -1))),
    _varlen_case("varlen out width", "out", out=lambda rand, d: rand(12, 4, 4)),
    # bind_attention, and calls of its run
    _bind_case("bind plan wrong type", "plan", plan="plan"),
    _bind_case("bind params not planned", "params", params=SLIDING),
    _bind_case("bind softmax_scale string", "softmax_scale", softmax_scale="0.1"),
    _paged_run("run paged q heads", "q", q=lambda rand, d: rand(5, 2, 8)),
    _paged_run("run paged q dtype", "q", q=lambda rand, d: rand(5, 4, 8, dt=torch.float32)),
    _paged_run("run paged k_cache page size", "k_cache", k=lambda rand, d: rand(6, 8, 2, 8)),
    _paged_run("run paged v_cache head_dim", "v_cache", v=lambda rand, d: rand(12, 4, 2, 4)),
    _paged_run("run paged out rows", "out", out=lambda rand, d: rand(4, 32)),
    _paged_run("run paged out dtype", "out", out=lambda rand, d: rand(7, 32, dt=torch.float32)),
    _paged_run("run paged out 3-D dtype", "out", out=lambda rand, d: rand(5, 4, 8, dt=torch.float32)),
    _packed_run("run packed q heads", "q", q=lambda rand, d: rand(10, 2, 8)),
    _packed_run("run packed k heads", "k", k=lambda rand, d: rand(10, 1, 8), v=lambda rand, d: rand(10, 1, 8)),
    _packed_run("run packed v head_dim", "v", v=lambda rand, d: rand(10, 2, 4)),
    _packed_run("run packed out width", "out", out=lambda rand, d: rand(12, 4, 4)),
    _packed_run("run packed q dtype", "q", q=lambda rand, d: rand(10, 4, 8, dt=torch.float32)),
    # a padded plan's run: [B, S, heads, d] tensors of exactly the plan's batch, S_q and S_k
    _bind_padded_case("bind padded params not planned", "params", params=SLIDING),
    _padded_run("run padded q 3-D (packed rows)", "q", q=lambda rand, d: rand(6, 4, 8)),
    _padded_run("run padded q batch", "q", q=lambda rand, d: rand(3, 3, 4, 8)),
    _padded_run("run padded q length", "q", q=lambda rand, d: rand(2, 4, 4, 8)),
    _padded_run("run padded q heads", "q", q=lambda rand, d: rand(2, 3, 2, 8)),
    _padded_run("run padded q dtype", "q", q=lambda rand, d: rand(2, 3, 4, 8, dt=torch.float32)),
    _padded_run("run padded q last dim strided", "q", q=lambda rand, d: rand(2, 3, 4, 16)[..., ::2]),
    _padded_run("run padded k length", "k", k=lambda rand, d: rand(2, 5, 2, 8)),
    _padded_run("run padded k heads", "k", k=lambda rand, d: rand(2, 6, 1, 8)),
    _padded_run("run padded k head_dim", "k", k=lambda rand, d: rand(2, 6, 2, 16)),
    _padded_run("run padded v length", "v", v=lambda rand, d: rand(2, 5, 2, 8)),
    _padded_run("run padded v head_dim", "v", v=lambda rand, d: rand(2, 6, 2, 4)),
    _padded_run("run padded v dtype", "v", v=lambda rand, d: rand(2, 6, 2, 8, dt=torch.float32)),
    _padded_run("run padded out shape", "out", out=lambda rand, d: rand(2, 3, 4, 4)),
    _padded_run("run padded out flat rows", "out", out=lambda rand, d: rand(6, 32)),
    _padded_run("run padded out dtype", "out", out=lambda rand, d: rand(2, 3, 4, 8, dt=torch.float32)),
    _padded_run("run padded out last dim strided", "out", out=lambda rand, d: rand(2, 3, 4, 16)[..., ::2]),
    # mla_v_up_proj
    _v_up("v_up int attn_output", "attn_output", attn_output=lambda rand, d: torch.ones(5, 4, 32, dtype=torch.int32, device=d)),
    _v_up("v_up attn_output rank", "attn_output", attn_output=lambda rand, d: rand(5, 128)),
    _v_up("v_up w_vc shape", "w_vc", w_vc=lambda rand, d: rand(4, 31, 16)),
    _v_up("v_up w_vc dtype", "w_vc", w_vc=lambda rand, d: rand(4, 32, 16, dt=torch.float32)),
    _v_up("v_up scale without MXFP4", "w_vc_scale", w_vc_scale=lambda rand, d: torch.ones(4, 16, 1, dtype=torch.uint8, device=d)),
    _v_up("v_up o_proj dtype string", "o_proj_weight_dtype", o_proj_weight_dtype="bf16"),
    # mla_query_for_backend
    _for_backend("for_backend no kv_lora_rank", "kv_lora_rank", kv_lora_rank=None),
    _for_backend("for_backend q rank", "q", q=lambda rand, d: rand(3, 160)),
    _for_backend("for_backend int q", "q", q=lambda rand, d: torch.ones(3, 4, 40, dtype=torch.int32, device=d)),
    _for_backend("for_backend q_rope heads", "q_rope", q=lambda rand, d: rand(3, 4, 32), q_rope=lambda rand, d: rand(3, 2, 8)),
    _for_backend("for_backend split kv_lora_rank", "q", q=lambda rand, d: rand(3, 4, 32), q_rope=lambda rand, d: rand(3, 4, 8), kv_lora_rank=16),
    _for_backend("for_backend decode_impl", "decode_impl", decode_impl=None),
    _for_backend("for_backend llama_4_scaling", "llama_4_scaling", llama_4_scaling="0.5"),
    # mla_decode_query (issue: mismatched inputs were silently reshaped)
    _decode("decode split q width", "q", q=lambda rand, d: rand(3, 4, 32), q_rope=lambda rand, d: rand(3, 4, 8), kv_lora_rank=16),
    _decode("decode concatenated heads", "q", num_heads=2),
    _decode("decode flat width", "q", q=lambda rand, d: rand(3, 42)),
    _decode("decode int q", "q", q=lambda rand, d: torch.ones(3, 4, 40, dtype=torch.int32, device=d)),
    _decode("decode num_heads=0", "num_heads", num_heads=0),
    _decode("decode kv_lora_rank=0", "kv_lora_rank", kv_lora_rank=0),
    _decode("decode no rope part", "kv_lora_rank", kv_lora_rank=40),
    _decode("decode q_rope tokens", "q_rope", q=lambda rand, d: rand(3, 4, 32), q_rope=lambda rand, d: rand(2, 4, 8)),
    _decode("decode q_rope heads", "q_rope", q=lambda rand, d: rand(3, 4, 32), q_rope=lambda rand, d: rand(3, 2, 8)),
    _decode("decode q_rope dtype", "q_rope", q=lambda rand, d: rand(3, 4, 32), q_rope=lambda rand, d: rand(3, 4, 8, dt=torch.float32)),
    _decode("decode decode_impl", "decode_impl", decode_impl=3),
    # build_mask_meta
    _mask("mask rank", "key_mask", key_mask=lambda rand, d: torch.ones(12, dtype=torch.bool, device=d)),
    _mask("mask not tensor", "key_mask", key_mask=[[True]]),
    # masked_attention
    _masked("masked int q", "q", q=lambda rand, d: torch.ones(2, 12, 4, 8, dtype=torch.int32, device=d)),
    _masked("masked q rank", "q", q=lambda rand, d: rand(24, 4, 8)),
    _masked("masked k head_dim", "k", k=lambda rand, d: rand(2, 12, 4, 16)),
    _masked("masked k batch", "k", k=lambda rand, d: rand(3, 12, 4, 8)),
    _masked("masked k dtype", "k", k=lambda rand, d: rand(2, 12, 4, 8, dt=torch.float32)),
    _masked("masked heads not a multiple", "q", k=lambda rand, d: rand(2, 12, 3, 8), v=lambda rand, d: rand(2, 12, 3, 8)),
    _masked("masked q heads fewer than k (no broadcast)", "q", q=lambda rand, d: rand(2, 12, 2, 8)),
    _masked("masked v shape", "v", v=lambda rand, d: rand(2, 11, 4, 8)),
    _masked("masked v head_dim", "v", v=lambda rand, d: rand(2, 12, 4, 16)),
    _masked("masked mask shorter than k", "mask_meta", mask_meta=lambda rand, d: MaskMeta(torch.ones(2, 11, dtype=torch.bool, device=d))),
    _masked("masked mask over q's length (cross)", "mask_meta", q=lambda rand, d: rand(2, 10, 4, 8), mask_meta=lambda rand, d: MaskMeta(torch.ones(2, 10, dtype=torch.bool, device=d))),
    _masked("masked GQA k/v heads differ", "v", k=lambda rand, d: rand(2, 12, 2, 8)),
    _masked("masked mask_meta a tensor", "mask_meta", mask_meta=lambda rand, d: torch.ones(2, 12, dtype=torch.bool, device=d)),
    _masked("masked softmax_scale", "softmax_scale", softmax_scale="1"),
)
