"""torch.compile: masked_attention traces to one custom op (no graph break), and compiled output equals eager.

CPU, the torch stand-in provider and TRITON_INTERPRET=1: the op's real implementation runs the same bound
calls as eager, so compiled and eager agree exactly; the fake implementation only gives the shape.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from varlen_masks import row, text_image_mask
from varlen_torch_provider import make_torch_provider, needs_interpreter

from attn_dispatch_varlen_diffusion.attention import build_ops
from attn_dispatch_varlen_diffusion.meta import Strategy

pytestmark = needs_interpreter

H, D = 4, 16
OP = "attn_dispatch_varlen_diffusion.masked_attention"
BACKENDS = [
    "aot_eager",
    pytest.param("inductor", marks=pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="Inductor's CPU backend needs a C++ compiler")),
]
CASES = {  # (key mask, S_q, K/V heads, general strategy)
    "general self": (text_image_mask([2, 4], text=5, image=3, text_first=True), None, H, "kv_pack"),
    "general self, Q packed": (text_image_mask([2, 4], text=5, image=3, text_first=True), None, H, "qkv_pack"),
    "prefix self": (torch.tensor([row("prefix", 8, 5), row("full", 8)]), None, H, "kv_pack"),
    "window self, zeroing": (torch.tensor([row("suffix", 8, 3), row("full", 8)]), None, H, "qkv_pack"),
    "cross, GQA": (text_image_mask([2, 4], text=5, image=3, text_first=True), 6, 2, "kv_pack"),
    "cross, prefix": (torch.tensor([row("prefix", 8, 5), row("none", 8)]), 11, 1, "kv_pack"),
}


def tensors(mask, seqlen_q, kv_heads, seed=0):
    gen = torch.Generator().manual_seed(seed)
    batch, seqlen_k = mask.shape
    q = torch.randn(batch, seqlen_q or seqlen_k, H, D, generator=gen).bfloat16()
    k, v = (torch.randn(batch, seqlen_k, kv_heads, D, generator=gen).bfloat16() for _ in range(2))
    return q, k, v


def graphs_of(fn, *args, backend="aot_eager"):
    """Compile ``fn`` (fullgraph) and return (result, the Dynamo graphs' code)."""
    codes = []

    def recording(gm, example_inputs):
        codes.append(gm.code)
        return torch._dynamo.lookup_backend(backend)(gm, example_inputs)

    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=recording)(*args), codes


@pytest.mark.parametrize("case", list(CASES))
def test_no_graph_break_and_compiled_equals_eager(case):
    mask, seqlen_q, kv_heads, general = CASES[case]
    ops = build_ops(make_torch_provider(), general_strategy=general, device_type="cpu", pack_queries=True if "packed" in case else None)
    meta = ops.build_mask_meta(mask)
    q, k, v = tensors(mask, seqlen_q, kv_heads)

    def block(q, k, v):
        return ops.masked_attention(q * 1.5, k, v, meta, softmax_scale=0.25) + 1

    torch._dynamo.reset()
    explain = torch._dynamo.explain(block)(q, k, v)
    assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons
    compiled, codes = graphs_of(block, q, k, v)
    assert len(codes) == 1 and codes[0].count(OP) == 1, codes
    assert torch.equal(compiled, block(q, k, v))
    # The op found the metadata object itself: its bound call sits beside eager's (scale as a float there)
    assert any(key[-1] == 0.25 for key in meta.calls)


def test_compiled_op_reads_keys_as_pages_where_eager_does():
    """``build_ops(key_pages=True)``: the compiled op binds its call with the op group's choice, as eager does."""
    provider = make_torch_provider()
    ops = build_ops(provider, general_strategy="kv_pack", device_type="cpu", key_pages=True)
    mask = text_image_mask([2, 4], text=5, image=3, text_first=True)
    q, k, v = tensors(mask, None, H)
    meta = ops.build_mask_meta(mask)
    eager = ops.masked_attention(q, k, v, meta)
    compiled, _ = graphs_of(lambda q, k, v: ops.masked_attention(q, k, v, meta), q, k, v)
    assert len(meta.calls) == 2  # eager's bound call and the compiled op's own (its scale is a float)
    assert provider.fwd.paged_calls == [True, True]
    assert torch.equal(compiled, eager)


@pytest.mark.parametrize("backend", BACKENDS)
def test_new_metadata_of_the_same_sizes_runs_its_own_mask(backend):
    """The metadata is an argument: a compiled graph reused for a new mask reads the new mask's tensors."""
    ops = build_ops(make_torch_provider(), general_strategy="kv_pack", device_type="cpu")
    first = text_image_mask([2, 4], text=5, image=3, text_first=True)
    second = text_image_mask([4, 2], text=5, image=3, text_first=True)  # same valid count, other positions
    q, k, v = tensors(first, 6, 2)

    def block(q, k, v, meta):
        return ops.masked_attention(q, k, v, meta)

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend=backend)
    for mask in (first, second, first):
        meta = ops.build_mask_meta(mask)
        want = block(q, k, v, meta)
        assert torch.equal(compiled(q, k, v, meta), want)
    assert not torch.equal(block(q, k, v, ops.build_mask_meta(first)), block(q, k, v, ops.build_mask_meta(second)))


def test_fake_implementation_gives_the_output_shape():
    ops = build_ops(make_torch_provider(), general_strategy="kv_pack", device_type="cpu")
    mask = text_image_mask([2, 4], text=5, image=3, text_first=True)
    meta = ops.build_mask_meta(mask)
    q, k, v = tensors(mask, 6, 2)
    from torch._subclasses.fake_tensor import FakeTensorMode

    from attn_dispatch_varlen_diffusion import custom_ops

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fq, fk, fv = (mode.from_tensor(x) for x in (q, k, v))
        out = torch.ops.attn_dispatch_varlen_diffusion.masked_attention(
            fq, fk, fv, *custom_ops._tensors_of(meta), 1, False, False, 0.25, 0
        )  # fmt: skip
    assert out.shape == (2, 6, H, D) and out.dtype == q.dtype


@pytest.mark.parametrize("general", ["kv_pack", "qkv_pack"])
def test_opcheck(general):
    """torch.library's own checks of each op's schema, fake implementation and (no) aliasing."""
    from attn_dispatch_varlen_diffusion import custom_ops

    ops = build_ops(make_torch_provider(), general_strategy=general, device_type="cpu", pack_queries=True)
    mask = text_image_mask([2, 4], text=5, image=3, text_first=True)
    meta = ops.build_mask_meta(mask)
    q, k, v = tensors(mask, 6 if general == "kv_pack" else None, 2)  # cross-attention; self (Q packed)
    strategy = custom_ops._STRATEGIES.index(meta.strategy)
    args = (q, k, v, *custom_ops._tensors_of(meta), strategy, meta.zero_masked_queries, meta.pack_queries, 0.25, ops._op_index)
    torch.library.opcheck(custom_ops.op_for(meta.strategy), args, test_utils=("test_schema", "test_faketensor"))


def _gaps_mask(valid: int) -> torch.Tensor:
    """A general ``[2, 16]`` mask: row 0 keeps ``valid`` keys in two runs, row 1 all 16 (total valid + 16)."""
    return torch.tensor([[True] * 2 + [False] * 2 + [s < valid - 2 for s in range(12)], [True] * 16])


def _prefix_mask(valid: int) -> torch.Tensor:
    return torch.tensor([row("prefix", 16, valid), row("full", 16)])


def _prefix_or_window_mask(valid: int) -> torch.Tensor:
    """Prefix layout for 5 and 11 valid keys, window (left padding) for 7: both zero-copy."""
    return torch.tensor([row("suffix", 16, 16 - valid) if valid == 7 else row("prefix", 16, valid), row("full", 16)])


VALID_COUNTS = (5, 7, 11)
RECOMPILE_CASES = {  # (mask maker, general strategy, pack_queries, the strategy the metas must get)
    "kv_pack, general": (_gaps_mask, "kv_pack", None, "kv_pack"),
    "qkv_pack, general, Q packed": (_gaps_mask, "qkv_pack", True, "qkv_pack"),
    "qkv_pack, general, Q in place": (_gaps_mask, "qkv_pack", False, "qkv_pack"),
    "zero_copy, prefix": (_prefix_mask, "kv_pack", None, "zero_copy"),
    "zero_copy, prefix, zeroing": (_prefix_mask, "qkv_pack", None, "zero_copy"),
    "zero_copy, prefix and window": (_prefix_or_window_mask, "kv_pack", None, "zero_copy"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(RECOMPILE_CASES))
def test_masks_with_other_valid_counts_reuse_one_graph(case, backend):
    """The valid-token count is no guarded host int: masks of one shape with 5, 7 and 11 valid keys run
    one compiled graph (a recompile per count would hit Dynamo's limit of 8 and fall back to eager)."""
    make_mask, general, pack_queries, strategy = RECOMPILE_CASES[case]
    ops = build_ops(make_torch_provider(), general_strategy=general, device_type="cpu", pack_queries=pack_queries)
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend(backend)(gm, example_inputs)

    def block(q, k, v, meta):
        return ops.masked_attention(q * 1.5, k, v, meta, softmax_scale=0.25) + 1

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend=counting)
    for valid in VALID_COUNTS:
        mask = make_mask(valid)
        meta = ops.build_mask_meta(mask)
        assert meta.strategy.value == strategy and meta.total == valid + 16
        q, k, v = tensors(mask, None, H, seed=valid)
        assert torch.equal(compiled(q, k, v, meta), block(q, k, v, meta)), valid
    assert len(graphs) == 1, [gm.code for gm in graphs]


def op_on_copies(ops, meta, q, k, v):
    """The custom op called on clones of ``meta``'s tensors (no metadata owns them), scale 0.25: returns
    (output, the clones, the strategy's op code)."""
    from attn_dispatch_varlen_diffusion import custom_ops

    copies = [None if t is None else t.clone() for t in custom_ops._tensors_of(meta)]
    strategy = custom_ops._STRATEGIES.index(meta.strategy)
    out = custom_ops.op_for(meta.strategy)(
        q, k, v, *copies, strategy, meta.zero_masked_queries, meta.pack_queries, 0.25, ops._op_index
    )
    return out, copies, strategy


@pytest.mark.parametrize("case", list(RECOMPILE_CASES))
def test_op_remakes_metadata_it_cannot_find(case, monkeypatch):
    """Tensors that are copies (no metadata owns them): kv_pack and zero_copy make the metadata from the
    copies alone (no rebuild, so no sync; layout and count unknown), qkv_pack rebuilds its count-sized parts
    from the key mask; either way the op computes what eager computes for the original metadata."""
    make_mask, general, pack_queries, _ = RECOMPILE_CASES[case]
    ops = build_ops(make_torch_provider(), general_strategy=general, device_type="cpu", pack_queries=pack_queries)
    from attn_dispatch_varlen_diffusion import custom_ops

    rebuild = custom_ops._rebuild
    rebuilt_strategies = []

    def counting_rebuild(tensors, scalars):
        rebuilt_strategies.append(custom_ops._STRATEGIES[scalars[0]])
        return rebuild(tensors, scalars)

    monkeypatch.setattr(custom_ops, "_rebuild", counting_rebuild)
    for valid in VALID_COUNTS:
        mask = make_mask(valid)
        meta = ops.build_mask_meta(mask)
        q, k, v = tensors(mask, None, H, seed=valid)
        out, copies, strategy = op_on_copies(ops, meta, q, k, v)
        remade = custom_ops._find(tuple(copies), (strategy, meta.zero_masked_queries, meta.pack_queries))
        counted = meta.strategy is Strategy.QKV_PACK
        assert (remade.layout, remade.total) == ((meta.layout, meta.total) if counted else (None, None))
        for name in ("indices", "masked"):
            want, got = getattr(meta, name), getattr(remade, name)
            assert want is got is None or (got.dtype == want.dtype and torch.equal(got, want)), name
        assert not meta.calls  # the op bound its call on the remade metadata, not on this one
        assert torch.equal(out, ops.masked_attention(q, k, v, meta, softmax_scale=0.25)), valid
    assert rebuilt_strategies == ([Strategy.QKV_PACK] * len(VALID_COUNTS) if case.startswith("qkv_pack") else [])


def test_only_the_counted_op_is_left_out_of_cuda_graphs():
    """qkv_pack's bound calls bake the valid count: Inductor's CUDA graphs must run its op outside the
    capture. kv_pack's and zero_copy's depend on shapes only, so theirs is captured."""
    tag = getattr(torch.Tag, "cudagraph_unsafe", None)
    if tag is None:
        pytest.skip("this torch has no cudagraph_unsafe tag")
    ns = torch.ops.attn_dispatch_varlen_diffusion
    assert tag in ns.masked_attention_counts.default.tags and tag not in ns.masked_attention.default.tags


@pytest.mark.parametrize("case", list(RECOMPILE_CASES))
def test_op_inside_a_capture_with_copied_metadata(case, monkeypatch):
    """CUDA graph trees hand the op copies of the metadata's tensors while capturing. Nothing is rebuilt
    (it would sync). kv_pack and zero_copy run their fast path on the copies: the same bytes as eager.
    qkv_pack runs SDPA with the key mask under the op's contract (zeros where a row has no valid key, and
    for masked query rows under the zeroing contract)."""
    make_mask, general, pack_queries, _ = RECOMPILE_CASES[case]
    ops = build_ops(make_torch_provider(), general_strategy=general, device_type="cpu", pack_queries=pack_queries)
    from attn_dispatch_varlen_diffusion import custom_ops

    def no_rebuild(*args):
        raise AssertionError("rebuilt inside a capture")

    monkeypatch.setattr(custom_ops, "_capturing", lambda tensor: True)
    monkeypatch.setattr(custom_ops, "_rebuild", no_rebuild)
    for valid in VALID_COUNTS:
        mask = make_mask(valid)
        mask[1] = False  # a batch row without any valid key
        meta = ops.build_mask_meta(mask)
        q, k, v = tensors(mask, None, H, seed=valid)
        out, _, _ = op_on_copies(ops, meta, q, k, v)
        want = ops.masked_attention(q, k, v, meta, softmax_scale=0.25)
        assert out.shape == want.shape and out.is_contiguous()
        if meta.strategy is Strategy.QKV_PACK:
            torch.testing.assert_close(out, want, rtol=1e-2, atol=5e-2)
        else:
            assert torch.equal(out, want)
        assert not out[1].any()  # no valid key: zeros, as the fast path gives
        if meta.zero_masked_queries:
            assert not out[0][~mask[0]].any()
