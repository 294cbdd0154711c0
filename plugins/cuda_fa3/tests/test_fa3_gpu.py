"""GPU (sm90 + an FA3 provider): the optimized path is byte-identical to the original one on the same kernels,
and CUDA graphs captured once replay to the same bytes as eager calls after seqlens and page tables change."""

from __future__ import annotations

import pytest
import torch
from attn_dispatch import OP_NAMES, load, reference
from attn_dispatch.bad_inputs import CASES as HOST_CASES
from attn_dispatch.bad_inputs import NotApplicable, expect_refused
from attn_dispatch.plans import DEFAULT_PARAMS, AttentionParams
from attn_dispatch_cuda_fa3 import build_ops, stats
from fa3_batches import cumulative, packed_batch, paged_batch

pytestmark = pytest.mark.cuda

SLIDING = AttentionParams(window_size=(127, 0))
NOT_CAUSAL = AttentionParams(causal=False)
SOFTCAP = AttentionParams(softcap=30.0)


def clone_args(args: dict) -> dict:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}


def both_paths(provider, batch, layer_params, out_rows=None):
    """{params: (optimized out, original out)} for one paged batch."""
    optimized, original = build_ops(provider), build_ops(provider, original=True)
    plans = [ops["make_attention_plan"](**batch.plan_args, layer_params=layer_params) for ops in (optimized, original)]
    results = {}
    for params in layer_params:
        outs = []
        for ops, plan in zip((optimized, original), plans):
            out = batch.out(rows=out_rows)
            ops["paged_attention_out"](batch.q, batch.k_cache, batch.v_cache, out, plan=plan, params=params)
            outs.append(out)
        results[params] = tuple(outs)
    return results


CASES = {
    # name: (q_lens, k_lens, heads, kv_heads, head_dim, page_size)
    "decode B=1 GQA4": ([1], [1024], 32, 8, 128, 16),
    "decode B=7 MHA page 1": ([1] * 7, [5, 300, 17, 1, 999, 64, 2048], 16, 16, 64, 1),
    "decode B=64 GQA8 page 64": ([1] * 64, [(37 * i) % 4000 + 1 for i in range(64)], 64, 8, 128, 64),
    "decode B=33 MQA d256": ([1] * 33, [(101 * i) % 3000 + 1 for i in range(33)], 8, 1, 256, 16),
    "decode B=16 GQA7": ([1] * 16, [4096] * 15 + [1], 28, 4, 128, 16),
    "mixed extend+decode": ([1, 17, 1, 300, 5], [2000, 17, 64, 812, 1025], 32, 8, 128, 16),
    "mixed page 32 GQA2": ([3, 1, 128, 1], [3, 4000, 128, 77], 16, 8, 64, 32),
}


PARAMS = {
    "causal": DEFAULT_PARAMS,
    "sliding 127": SLIDING,
    "not causal": NOT_CAUSAL,
    "softcap 30": SOFTCAP,
    "sliding 63, 1 split": AttentionParams(window_size=(63, 0), num_splits=1),
}


@pytest.mark.parametrize("params", list(PARAMS))
@pytest.mark.parametrize("case", list(CASES))
def test_optimized_and_original_are_byte_identical(provider, case, params):
    q_lens, k_lens, heads, kv_heads, head_dim, page_size = CASES[case]
    batch = paged_batch(
        q_lens=q_lens, k_lens=k_lens, heads=heads, kv_heads=kv_heads, head_dim=head_dim, page_size=page_size,
        device="cuda", padding_rows=3, spare_columns=2,
    )  # fmt: skip
    rows = batch.q.shape[0] + 2
    optimized, original = both_paths(provider, batch, (PARAMS[params],), out_rows=rows)[PARAMS[params]]
    real = batch.tokens
    assert torch.equal(optimized[:real], original[:real])
    assert (optimized[batch.q.shape[0] :] == 7.0).all(), "rows past q's rows must never be written"
    assert not optimized[:real].isnan().any()
    assert stats.out_copies == (0 if provider.writes_out else 1)


def test_matches_the_portable_reference(provider):
    batch = paged_batch(q_lens=[1, 9, 1], k_lens=[300, 40, 77], heads=8, kv_heads=2, head_dim=128, device="cuda")
    optimized, _ = both_paths(provider, batch, (SLIDING,))[SLIDING]
    want = batch.out()
    reference.paged_attention_out(batch.q, batch.k_cache, batch.v_cache, want, plan=reference.make_attention_plan(**batch.plan_args, layer_params=(SLIDING,)), params=SLIDING)
    torch.testing.assert_close(optimized.float(), want.float(), atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("lens,heads,kv_heads", [([2048], 32, 8), ([512, 1000, 3, 77], 32, 8), ([8192], 16, 16)])
@pytest.mark.parametrize("params", [DEFAULT_PARAMS, SLIDING, NOT_CAUSAL])
def test_varlen_optimized_and_original_are_byte_identical(provider, lens, heads, kv_heads, params):
    q, k, v, lengths = packed_batch(lens=lens, heads=heads, kv_heads=kv_heads, head_dim=128, device="cuda")
    outs = []
    for original in (False, True):
        out = torch.full((q.shape[0], heads * 128), 7.0, dtype=q.dtype, device="cuda")
        build_ops(provider, original=original)["varlen_attention_out"](q, k, v, out, **lengths, params=params)
        outs.append(out)
    assert torch.equal(*outs)


@pytest.mark.parametrize("lens,k_lens,heads,kv_heads", [([2048], None, 32, 8), ([512, 1000, 3, 77], None, 32, 8), ([5, 1, 300], [40, 900, 300], 16, 16)])
@pytest.mark.parametrize("params", [DEFAULT_PARAMS, SOFTCAP, NOT_CAUSAL])
def test_packed_plan_run_equals_varlen_bytes(provider, lens, k_lens, heads, kv_heads, params):
    """A packed plan's run (FA3 handed the plan's scheduler metadata) writes the bytes of the unplanned
    varlen call (FA3 scheduling itself) and of the original path; one metadata launch for every layer."""
    q, k, v, lengths = packed_batch(lens=lens, k_lens=k_lens, heads=heads, kv_heads=kv_heads, head_dim=128, device="cuda")
    ops, original = build_ops(provider), build_ops(provider, original=True)
    planned = torch.full((q.shape[0], heads, 128), 7.0, dtype=q.dtype, device="cuda")
    unplanned, orig = planned.clone(), planned.clone()
    builds = stats.metadata_builds
    plan = ops["make_attention_plan"](**lengths, num_heads=heads, num_kv_heads=kv_heads, head_dim=128, layer_params=(params,))
    run = ops["bind_attention"](plan, params=params)
    for _ in range(3):  # layers
        run(q, k, v, planned)
    assert stats.metadata_builds == builds + 1
    ops["varlen_attention_out"](q, k, v, unplanned, **lengths, params=params)
    original["varlen_attention_out"](q, k, v, orig, **lengths, params=params)
    assert torch.equal(planned, unplanned) and torch.equal(planned, orig)


@pytest.mark.parametrize("case", ["decode B=7 MHA page 1", "mixed extend+decode"])
def test_paged_run_equals_paged_attention_out_bytes(provider, case):
    q_lens, k_lens, heads, kv_heads, head_dim, page_size = CASES[case]
    batch = paged_batch(q_lens=q_lens, k_lens=k_lens, heads=heads, kv_heads=kv_heads, head_dim=head_dim, page_size=page_size, device="cuda")
    ops = build_ops(provider)
    plan = ops["make_attention_plan"](**batch.plan_args)
    flat, rows = batch.out(), batch.out()
    ops["paged_attention_out"](batch.q, batch.k_cache, batch.v_cache, flat, plan=plan)
    ops["bind_attention"](plan)(batch.q, batch.k_cache, batch.v_cache, rows.view(rows.shape[0], heads, head_dim)[: batch.q.shape[0]])
    assert torch.equal(flat, rows)


class GraphInputs:
    """Static CUDA-graph inputs for up to ``max_batch`` sequences of up to ``max_q`` new tokens each."""

    def __init__(self, *, max_batch: int, max_q: int, columns: int, layers: int, heads=32, kv_heads=8, head_dim=128, page=16):
        self.shape = dict(heads=heads, kv_heads=kv_heads, head_dim=head_dim, page=page)
        self.max_q, self.columns = max_q, columns
        rows = max_batch * max_q
        pages = max_batch * columns + 8
        dev = "cuda"
        self.q = torch.zeros(rows, heads, head_dim, dtype=torch.bfloat16, device=dev)
        self.k_caches = [torch.randn(pages, page, kv_heads, head_dim, dtype=torch.bfloat16, device=dev) for _ in range(layers)]
        self.v_caches = [torch.randn(pages, page, kv_heads, head_dim, dtype=torch.bfloat16, device=dev) for _ in range(layers)]
        self.outs = [torch.zeros(rows, heads * head_dim, dtype=torch.bfloat16, device=dev) for _ in range(layers)]
        self.cache_seqlens = torch.zeros(max_batch, dtype=torch.int32, device=dev)
        self.page_table = torch.zeros(max_batch, columns, dtype=torch.int32, device=dev)
        self.cu_seqlens_q = torch.zeros(max_batch + 1, dtype=torch.int32, device=dev)
        self.pages = pages

    def load(self, q_lens: list[int], k_lens: list[int], seed: int) -> dict:
        """Write a new batch into the static buffers; return make_attention_plan's arguments over them."""
        g = torch.Generator().manual_seed(seed)
        batch = len(q_lens)
        self.cache_seqlens[:batch].copy_(torch.tensor(k_lens, dtype=torch.int32))
        table = torch.randperm(self.pages, generator=g)[: batch * self.columns].view(batch, self.columns)
        self.page_table[:batch].copy_(table.int())
        self.cu_seqlens_q[: batch + 1].copy_(cumulative(q_lens, "cpu"))
        self.q.copy_(torch.randn(self.q.shape, generator=g).bfloat16())
        s = self.shape
        return dict(
            cache_seqlens=self.cache_seqlens[:batch], page_table=self.page_table[:batch],
            cu_seqlens_q=self.cu_seqlens_q[: batch + 1], max_seqlen_q=self.max_q,
            max_seqlen_k=self.columns * s["page"], page_size=s["page"], num_heads=s["heads"],
            num_kv_heads=s["kv_heads"], head_dim=s["head_dim"], dtype=torch.bfloat16,
        )  # fmt: skip

    def tokens(self, batch: int) -> int:
        return batch * self.max_q

    def layers(self, ops, plan, layer_params, batch: int) -> None:
        q = self.q[: self.tokens(batch)]
        for i, (k, v, out) in enumerate(zip(self.k_caches, self.v_caches, self.outs)):
            ops["paged_attention_out"](q, k, v, out, plan=plan, params=layer_params[i % len(layer_params)])

    def eager_outputs(self, ops, args: dict, layer_params, batch: int) -> list[torch.Tensor]:
        plan = ops["make_attention_plan"](**clone_args(args), layer_params=layer_params)
        saved = [out.clone() for out in self.outs]
        self.layers(ops, plan, layer_params, batch)
        results = [out.clone() for out in self.outs]
        for out, old in zip(self.outs, saved):
            out.copy_(old)
        return results


def capture(fn) -> torch.cuda.CUDAGraph:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the graph (lazy kernel attributes, allocator)
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


STEPS = [  # (q_lens, k_lens) per replay: batch fixed at 5 (the captured size), everything else changes
    ([1] * 5, [33, 1, 4000, 517, 2048]),
    ([1] * 5, [4096, 4096, 4096, 4096, 4096]),
    ([1] * 5, [1, 2, 3, 4, 5]),
]
MIXED_STEPS = [([4, 1, 2, 1, 3], [40, 900, 2, 4096, 3]), ([1, 1, 4, 4, 1], [1, 17, 4, 3000, 64])]


@pytest.mark.parametrize("steps", [STEPS, MIXED_STEPS], ids=["decode", "mixed"])
def test_graph_with_static_plan_replays_eager_bytes(provider, steps):
    """Plan outside the graph: one buffer for the largest batch (16), a graph for batch 5 over its front."""
    layer_params = (DEFAULT_PARAMS, SLIDING)
    ops, original = build_ops(provider), build_ops(provider, original=True)
    max_q = max(max(q) for q, _ in steps)
    inputs = GraphInputs(max_batch=16, max_q=max_q, columns=256, layers=4)
    largest = ops["make_attention_plan"](**inputs.load([1] * 16, [100] * 16, seed=0), layer_params=layer_params)
    first = steps[0]
    captured = ops["make_attention_plan"](**inputs.load(*first, seed=1), layer_params=layer_params, static_plan=largest)
    graph = capture(lambda: inputs.layers(ops, captured, layer_params, 5))

    for step, (q_lens, k_lens) in enumerate(steps):
        args = inputs.load(q_lens, k_lens, seed=10 + step)
        real = sum(q_lens)
        assert ops["make_attention_plan"](**args, layer_params=layer_params, static_plan=captured) is captured
        for params in layer_params:
            used = captured.metadata[params].numel()
            assert (captured.metadata_buffers[params][used:] == 0).all()
        graph.replay()
        replayed = [out.clone() for out in inputs.outs]
        for want_ops in (ops, original):
            for got, want in zip(replayed, inputs.eager_outputs(want_ops, args, layer_params, 5)):
                assert torch.equal(got[:real], want[:real]), f"step {step}"


def test_graph_with_plan_inside_replays_eager_bytes(provider):
    """Plan inside the graph: its metadata kernel is replayed with the layers; nothing to refresh."""
    layer_params = (DEFAULT_PARAMS, SLIDING)
    ops = build_ops(provider)
    inputs = GraphInputs(max_batch=5, max_q=1, columns=256, layers=4)
    args = inputs.load(*STEPS[0], seed=1)
    graph = capture(lambda: inputs.layers(ops, ops["make_attention_plan"](**args, layer_params=layer_params), layer_params, 5))
    builds = stats.metadata_builds
    for step, (q_lens, k_lens) in enumerate(STEPS):
        args = inputs.load(q_lens, k_lens, seed=20 + step)
        graph.replay()
        replayed = [out.clone() for out in inputs.outs]
        for got, want in zip(replayed, inputs.eager_outputs(ops, args, layer_params, 5)):
            assert torch.equal(got[:5], want[:5]), f"step {step}"
    assert stats.metadata_builds == builds + len(STEPS) * len(layer_params)  # the eager references only


def test_load_resolves_this_plugin(provider):
    ops = load(refresh=True)
    resolution = ops.resolutions["paged_attention_out"]
    assert resolution.plugin == "cuda_fa3", ops.summary()
    assert resolution.note.startswith(provider.name)


def test_compiled_layers_write_out_in_place_with_the_real_provider(provider):
    import re

    from torch._inductor.utils import run_and_get_code

    ops = build_ops(provider)
    batch = paged_batch(q_lens=[1, 5, 1], k_lens=[700, 64, 33], heads=32, kv_heads=8, head_dim=128, device="cuda")
    plan = ops["make_attention_plan"](**batch.plan_args, layer_params=(DEFAULT_PARAMS, SLIDING))

    def two_layers(q, k_cache, v_cache, out_a, out_b):
        ops["paged_attention_out"](q, k_cache, v_cache, out_a, plan=plan)
        ops["paged_attention_out"](q * 2, k_cache, v_cache, out_b, plan=plan, params=SLIDING)

    compiled = [batch.out(), batch.out()]
    torch._dynamo.reset()
    _, codes = run_and_get_code(torch.compile(two_layers, fullgraph=True), batch.q, batch.k_cache, batch.v_cache, *compiled)
    code = "\n".join(codes)
    assert code.count("torch.ops.attn_dispatch_cuda_fa3.attention_out.default(") == 2, code
    assert not re.search(r"\bclone\b|\.copy_\(|aten\.copy", code), code
    eager = [batch.out(), batch.out()]
    two_layers(batch.q, batch.k_cache, batch.v_cache, *eager)
    assert all(torch.equal(a, b) for a, b in zip(compiled, eager))


# ---- bad input with the real FA3: its host checks refuse before any launch, the plugin names the argument


def _poisoned(t: torch.Tensor) -> torch.Tensor:
    return torch.full((t.shape[1], t.shape[0]), 7.0, dtype=t.dtype, device=t.device).t()  # transposed: not contiguous


GPU_PAGED_ERRORS = {
    "q float32": (lambda a: a.update(q=a["q"].float()), "q"),
    "q on the CPU": (lambda a: a.update(q=a["q"].cpu()), "q"),
    "q strided last dim": (lambda a: a.update(q=a["q"].repeat_interleave(2, dim=2)[..., ::2]), "q"),
    "k_cache float16": (lambda a: a.update(k_cache=a["k_cache"].half()), "k_cache"),
    "k_cache page size": (lambda a: a.update(k_cache=a["k_cache"][:, :8]), "k_cache"),
    "v_cache on the CPU": (lambda a: a.update(v_cache=a["v_cache"].cpu()), "v_cache"),
    "out float32": (lambda a: a.update(out=a["out"].float()), "out"),
    "out too short": (lambda a: a.update(out=a["out"][:3]), "out"),
    "out not contiguous": (lambda a: a.update(out=_poisoned(a["out"])), "out"),
}


@pytest.mark.parametrize("case", list(GPU_PAGED_ERRORS))
def test_paged_bad_input_is_named_and_nothing_written(provider, case):
    mutate, arg = GPU_PAGED_ERRORS[case]
    ops = build_ops(provider)
    batch = paged_batch(q_lens=[1, 5, 1, 3], k_lens=[37, 20, 6, 3], heads=4, kv_heads=2, head_dim=64, device="cuda")
    args = dict(q=batch.q, k_cache=batch.k_cache, v_cache=batch.v_cache, out=batch.out())
    plan = ops["make_attention_plan"](**batch.plan_args)
    mutate(args)
    before = args["out"].clone()
    with pytest.raises(ValueError, match=f"^{arg}: "):
        ops["paged_attention_out"](args["q"], args["k_cache"], args["v_cache"], args["out"], plan=plan)
    torch.cuda.synchronize()
    assert torch.equal(args["out"], before)


GPU_VARLEN_ERRORS = {
    "q float32": (lambda a: a.update(q=a["q"].float()), "q"),
    "k on the CPU": (lambda a: a.update(k=a["k"].cpu()), "k"),
    "heads not divisible": (lambda a: a.update(k=torch.cat([a["k"]] * 2, 1)[:, :4], v=torch.cat([a["v"]] * 2, 1)[:, :4]), "q"),
    "v tokens": (lambda a: a.update(v=a["v"][:-1]), "v"),
    "cu_seqlens_k length": (lambda a: a.update(cu_seqlens_k=a["cu_seqlens_k"][:-1]), "cu_seqlens_k"),
    "cu_seqlens_q int64": (lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"].long()), "cu_seqlens_q"),
    "out shape": (lambda a: a.update(out=a["out"][:, :2]), "out"),
}


@pytest.mark.parametrize("case", list(GPU_VARLEN_ERRORS))
def test_varlen_bad_input_is_named_and_nothing_written(provider, case):
    mutate, arg = GPU_VARLEN_ERRORS[case]
    q, k, v, lens = packed_batch(lens=[5, 9], heads=6, kv_heads=2, head_dim=64, device="cuda")
    args = dict(q=q, k=k, v=v, out=torch.full((14, 6, 64), 7.0, dtype=q.dtype, device="cuda"), **lens)
    mutate(args)
    out = args.pop("out")
    before = out.clone()
    with pytest.raises(ValueError, match=f"^{arg}: "):
        build_ops(provider)["varlen_attention_out"](args.pop("q"), args.pop("k"), args.pop("v"), out, **args)
    torch.cuda.synchronize()
    assert torch.equal(out, before)


ATTENTION_OUT_OPS = ("make_attention_plan", "paged_attention_out", "varlen_attention_out")


@pytest.mark.parametrize("original", [False, True], ids=["optimized", "original"])
@pytest.mark.parametrize("case", [c for c in HOST_CASES if c.op in ATTENTION_OUT_OPS], ids=lambda c: c.id)
def test_host_bad_input_cases_are_refused_with_the_real_provider(provider, case, original):
    """The host's bad-input cases (what the CPU reference refuses) on the H200: same argument named."""
    ops = {op: getattr(reference, op) for op in OP_NAMES} | build_ops(provider, original=original)
    try:
        expect_refused(ops, case, "cuda", torch.bfloat16)
    except NotApplicable as exc:  # padded plans are optional: FA4 makes none
        pytest.skip(str(exc))
    torch.cuda.synchronize()
