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

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fq, fk, fv = (mode.from_tensor(x) for x in (q, k, v))
        out = torch.ops.attn_dispatch_varlen_diffusion.masked_attention(
            fq, fk, fv, meta.key_mask, meta.seqlens, meta.cu_seqlens_padded, meta.cu_seqlens_k, meta.indices, None,
            None, 2, 1, False, meta.total, False, 0.25, 0,
        )  # fmt: skip
    assert out.shape == (2, 6, H, D) and out.dtype == q.dtype


def test_opcheck():
    """torch.library's own checks of the op's schema, fake implementation and (no) aliasing."""
    ops = build_ops(make_torch_provider(), general_strategy="kv_pack", device_type="cpu")
    mask = text_image_mask([2, 4], text=5, image=3, text_first=True)
    meta = ops.build_mask_meta(mask)
    q, k, v = tensors(mask, 6, 2)
    args = (
        q, k, v, meta.key_mask, meta.seqlens, meta.cu_seqlens_padded, meta.cu_seqlens_k, meta.indices, meta.inverse,
        meta.masked, 2, 1, False, meta.total, False, 0.25, ops._op_index,
    )  # fmt: skip
    torch.library.opcheck(torch.ops.attn_dispatch_varlen_diffusion.masked_attention.default, args, test_utils=("test_schema", "test_faketensor"))
