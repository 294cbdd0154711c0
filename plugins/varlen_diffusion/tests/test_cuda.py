"""On an sm90/sm100 GPU with a FlashAttention provider: the strategies against SDPA, bit-equality of
zero-copy and K/V pack, the kernels at benchmark size, no host syncs, and CUDA-graph capture."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from varlen_masks import row, text_image_mask

import attn_dispatch
import attn_dispatch_flash as flash_providers
from attn_dispatch.reference import masked as original
from attn_dispatch_varlen_diffusion import ARCHS, NAME
from attn_dispatch_varlen_diffusion.meta import Strategy

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]

H, D = 8, 128
RTOL, ATOL = 1e-2, 5e-2


@pytest.fixture(scope="module")
def provider():
    arch = attn_dispatch.detect(0).arch
    if arch not in ARCHS:
        pytest.skip(f"{arch} is not one of {ARCHS}")
    found, reason = flash_providers.probe(flash_providers.probe_order(arch))
    if found is None:
        pytest.skip(reason)
    return found


def ops_for(provider, general: str, zero_copy: bool = True, pack_queries: bool | None = None):
    from attn_dispatch_varlen_diffusion.attention import build_ops

    return build_ops(provider, general_strategy=general, zero_copy=zero_copy, pack_queries=pack_queries)


def qkv(batch: int, seqlen: int, *, fused: bool = False, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    if fused:
        return torch.randn(batch, seqlen, 3, H, D, generator=gen, device="cuda").bfloat16().unbind(2)
    return tuple(torch.randn(batch, seqlen, H, D, generator=gen, device="cuda").bfloat16() for _ in range(3))


MASKS = {
    "prefix": text_image_mask([100, 37], text=128, image=1000, text_first=False),
    "general": text_image_mask([100, 37], text=128, image=1000, text_first=True),
    "left_padding": torch.tensor([row("suffix", 1128, 40), row("suffix", 1128, 500)]),
    "empty_row": torch.tensor([row("none", 1128), row("gaps", 1128, bits=(1 << 1128) - 1 - (0xFFFF << 300))]),
}


@pytest.mark.parametrize(("general", "pack_queries"), [("kv_pack", None), ("qkv_pack", True), ("qkv_pack", False)])
@pytest.mark.parametrize("zero_copy", [True, False])
@pytest.mark.parametrize("name", list(MASKS))
def test_rows_follow_the_contract(provider, name, general, zero_copy, pack_queries):
    mask = MASKS[name].cuda()
    q, k, v = qkv(*mask.shape)
    ops = ops_for(provider, general, zero_copy, pack_queries)
    out = ops.masked_attention(q, k, v, ops.build_mask_meta(mask)).float()
    ref = original.masked_attention(q, k, v, original.build_mask_meta(mask)).float()
    for b in range(mask.shape[0]):
        valid = mask[b]
        if not valid.any():
            assert torch.equal(out[b], torch.zeros_like(out[b]))  # SDPA: NaN or zeros, by backend
            continue
        torch.testing.assert_close(out[b, valid], ref[b, valid], rtol=RTOL, atol=ATOL)
        if general == "qkv_pack":
            assert torch.equal(out[b, ~valid], torch.zeros_like(out[b, ~valid]))
        else:
            torch.testing.assert_close(out[b, ~valid], ref[b, ~valid], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", ["prefix", "left_padding"])
def test_zero_copy_equals_kv_pack_on_valid_rows(provider, name):
    mask = MASKS[name].cuda()
    q, k, v = qkv(*mask.shape)
    results = []
    for zero_copy in (True, False):
        ops = ops_for(provider, "kv_pack", zero_copy)
        meta = ops.build_mask_meta(mask)
        assert meta.strategy is (Strategy.ZERO_COPY if zero_copy else Strategy.KV_PACK)
        results.append(ops.masked_attention(q, k, v, meta))
    valid = mask[:, :, None, None].expand_as(q)
    assert torch.equal(results[0][valid], results[1][valid])


@pytest.mark.parametrize("name", ["prefix", "general"])
def test_one_row_heads_first_layout_is_read_in_place(provider, name):
    """B=1 q/k/v as [B, S, H, D] transposes of contiguous [B, H, S, D] tensors: FlashAttention reads
    them as views, and the output is the same bytes as from contiguous copies."""
    mask = MASKS[name][:1].cuda()
    gen = torch.Generator(device="cuda").manual_seed(3)
    heads_first = [torch.randn(1, H, mask.shape[1], D, generator=gen, device="cuda").bfloat16() for _ in range(3)]
    q, k, v = (x.transpose(1, 2) for x in heads_first)
    ops = ops_for(provider, "kv_pack")
    meta = ops.build_mask_meta(mask)
    out = ops.masked_attention(q, k, v, meta)
    assert torch.equal(out, ops.masked_attention(*(x.contiguous() for x in (q, k, v)), meta))


def test_strided_qkv_slices(provider):
    """q/k/v as slices of one fused projection (row stride 3*H*D) on every strategy."""
    mask = MASKS["prefix"].cuda()
    q, k, v = qkv(*mask.shape, fused=True)
    ref = original.masked_attention(q, k, v, original.build_mask_meta(mask)).float()
    valid = mask[:, :, None, None].expand_as(q)
    for general, zero_copy in (("kv_pack", True), ("kv_pack", False), ("qkv_pack", True), ("qkv_pack", False)):
        ops = ops_for(provider, general, zero_copy)
        out = ops.masked_attention(q, k, v, ops.build_mask_meta(mask)).float()
        torch.testing.assert_close(out[valid], ref[valid], rtol=RTOL, atol=ATOL)


def test_kernels_bit_exact_at_benchmark_size():
    from attn_dispatch_flash.rows import gather_rows, scatter_rows

    mask = text_image_mask([384, 256], text=512, image=4096, text_first=True).cuda()
    batch, seqlen = mask.shape
    fused = torch.randn(batch, seqlen, 3, 24, 128, device="cuda").bfloat16()
    sources = fused.unbind(2)
    indices = mask.reshape(-1).nonzero().squeeze(1).int()
    packed = gather_rows(sources, indices)
    want = torch.stack([x.reshape(-1, 24, 128).index_select(0, indices.long()) for x in sources])
    assert torch.equal(packed.view(torch.int16), want.view(torch.int16))
    inverse = torch.full((batch * seqlen,), -1, dtype=torch.int32, device="cuda")
    inverse[indices.long()] = torch.arange(indices.numel(), dtype=torch.int32, device="cuda")
    scattered = scatter_rows(packed[1], inverse, batch, seqlen)
    expected = torch.zeros(batch * seqlen, 24, 128, device="cuda").bfloat16().index_copy_(0, indices.long(), packed[1])
    assert torch.equal(scattered.view(-1, 24, 128).view(torch.int16), expected.view(torch.int16))
    assert gather_rows(sources, indices[:0]).shape == (3, 0, 24, 128)


@pytest.mark.parametrize("general", ["kv_pack", "qkv_pack"])
@pytest.mark.parametrize("name", ["prefix", "general"])
def test_no_host_sync_and_cuda_graph_replay(provider, name, general):
    mask = MASKS[name].cuda()
    q, k, v = qkv(*mask.shape)
    ops = ops_for(provider, general)
    meta = ops.build_mask_meta(mask)  # per request: may sync once
    eager = ops.masked_attention(q, k, v, meta)  # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.masked_attention(q, k, v, meta)
    finally:
        torch.cuda.set_sync_debug_mode("default")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.masked_attention(q, k, v, meta)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ops.masked_attention(q, k, v, meta)
    fresh = qkv(*mask.shape, seed=1)
    for static, new in zip((q, k, v), fresh):
        static.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, ops.masked_attention(*fresh, meta))
    assert not torch.equal(captured, eager)


def test_load_registers_the_plugin():
    ops = attn_dispatch.load(refresh=True)
    if ops.hardware.arch not in ARCHS:
        pytest.skip(f"{ops.hardware.arch} is not a target")
    report = next(p for p in ops.plugins if p.name == NAME)
    assert report.status == "active", report.reason
    assert ops.resolutions["masked_attention"].plugin == NAME


@pytest.mark.parametrize("name", ["general", "left_padding"])
def test_qkv_pack_with_queries_in_place_is_kv_pack_with_masked_rows_zeroed(provider, name):
    mask = MASKS[name].cuda()
    q, k, v = qkv(*mask.shape)
    kv = ops_for(provider, "kv_pack", zero_copy=False)
    in_place = ops_for(provider, "qkv_pack", zero_copy=False, pack_queries=False)
    a = kv.masked_attention(q, k, v, kv.build_mask_meta(mask))
    meta = in_place.build_mask_meta(mask)
    assert meta.strategy is Strategy.QKV_PACK and not meta.pack_queries
    b = in_place.masked_attention(q, k, v, meta)
    assert torch.equal(a[mask], b[mask]) and not b[~mask].any()


# Cross-attention (S_q != S_k) and GQA, the bound launches, torch.compile.
def sdpa_gqa(q, k, v, mask, scale=None):
    group = q.shape[2] // k.shape[2]
    k, v = (x.float().repeat_interleave(group, dim=2).transpose(1, 2) for x in (k, v))
    out = torch.nn.functional.scaled_dot_product_attention(
        q.float().transpose(1, 2), k, v, attn_mask=mask[:, None, None, :], scale=scale
    )
    return out.transpose(1, 2)


def cross_inputs(batch, seqlen_q, seqlen_k, kv_heads, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(batch, seqlen_q, H, D, generator=gen, device="cuda").bfloat16()
    k, v = torch.randn(batch, seqlen_k, 2, kv_heads, D, generator=gen, device="cuda").bfloat16().unbind(2)
    return q, k, v


TEXT_MASKS = {  # [B, S_k] text padding masks
    "right_padding": torch.tensor([row("prefix", 300, 120), row("prefix", 300, 300)]),
    "left_padding": torch.tensor([row("suffix", 300, 77), row("full", 300)]),
    "gaps": text_image_mask([100, 37], text=128, image=172, text_first=True),
    "empty_row": torch.tensor([row("none", 300), row("prefix", 300, 9)]),
}


@pytest.mark.parametrize(("general", "pack_queries"), [("kv_pack", None), ("qkv_pack", True), ("qkv_pack", False)])
@pytest.mark.parametrize("zero_copy", [True, False])
@pytest.mark.parametrize("kv_heads", [H, 2])
@pytest.mark.parametrize("name", list(TEXT_MASKS))
def test_cross_attention_and_gqa_against_sdpa(provider, name, kv_heads, zero_copy, general, pack_queries):
    mask = TEXT_MASKS[name].cuda()
    q, k, v = cross_inputs(mask.shape[0], 1024, mask.shape[1], kv_heads)
    ops = ops_for(provider, general, zero_copy, pack_queries)
    meta = ops.build_mask_meta(mask)
    out = ops.masked_attention(q, k, v, meta, softmax_scale=0.1)
    assert out.shape == q.shape and out.is_contiguous()
    ref = sdpa_gqa(q, k, v, mask, scale=0.1)
    for b in range(mask.shape[0]):
        if mask[b].any():  # every query row is valid in cross-attention
            torch.testing.assert_close(out[b].float(), ref[b], rtol=RTOL, atol=ATOL)
        else:
            assert not out[b].any()


@pytest.mark.parametrize("general", ["kv_pack", "qkv_pack"])
def test_gqa_self_attention_against_sdpa(provider, general):
    mask = MASKS["general"].cuda()
    q, k, v = cross_inputs(mask.shape[0], mask.shape[1], mask.shape[1], 2)
    ops = ops_for(provider, general, pack_queries=True if general == "qkv_pack" else None)
    out = ops.masked_attention(q, k, v, ops.build_mask_meta(mask)).float()
    ref = sdpa_gqa(q, k, v, mask)
    torch.testing.assert_close(out[mask], ref[mask], rtol=RTOL, atol=ATOL)
    if general == "kv_pack":
        torch.testing.assert_close(out[~mask], ref[~mask], rtol=RTOL, atol=ATOL)
    else:
        assert not out[~mask].any()


@pytest.mark.parametrize("offset", [0, 1])  # 1: pointers off 16-byte alignment (Triton specializes on it)
def test_bound_launches_equal_the_triton_launcher(offset):
    from attn_dispatch_flash.rows import gather_rows, scatter_rows
    from attn_dispatch_flash.rows_launch import bind_gather, bind_scatter, index_select_gather

    mask = MASKS["general"].cuda()
    batch, seqlen = mask.shape
    flat = torch.randn(batch * seqlen * 3 * H * D + offset, device="cuda").bfloat16()[offset:]
    sources = flat.view(batch, seqlen, 3, H, D).unbind(2)
    indices = mask.reshape(-1).nonzero().squeeze(1).int()
    for group in (sources, sources[1:], sources[:1]):
        want = gather_rows(group, indices)
        assert torch.equal(bind_gather(group, indices)(*group), want)
        rows_view = index_select_gather(group, indices)
        if rows_view is not None:
            assert torch.equal(rows_view(*group), want)
    packed = gather_rows(sources[:1], indices)[0]
    inverse = torch.full((batch * seqlen,), -1, dtype=torch.int32, device="cuda")
    inverse[indices.long()] = torch.arange(indices.numel(), dtype=torch.int32, device="cuda")
    assert torch.equal(bind_scatter(packed, inverse, batch, seqlen)(packed), scatter_rows(packed, inverse, batch, seqlen))


@pytest.mark.parametrize("name", ["right_padding", "gaps"])
def test_cross_attention_no_host_sync_and_cuda_graph_replay(provider, name):
    mask = TEXT_MASKS[name].cuda()
    q, k, v = cross_inputs(mask.shape[0], 1024, mask.shape[1], 2)
    ops = ops_for(provider, "kv_pack")
    meta = ops.build_mask_meta(mask)
    eager = ops.masked_attention(q, k, v, meta)  # binds the call (compiles the pack kernel)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.masked_attention(q, k, v, meta)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.masked_attention(q, k, v, meta)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ops.masked_attention(q, k, v, meta)
    fresh = cross_inputs(mask.shape[0], 1024, mask.shape[1], 2, seed=1)
    for static, new in zip((q, k, v), fresh):
        static.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, ops.masked_attention(*fresh, meta)) and not torch.equal(captured, eager)


@pytest.mark.parametrize("name", ["general", "prefix"])
def test_torch_compile_matches_eager(provider, name):
    mask = MASKS[name].cuda()
    q, k, v = qkv(*mask.shape)
    ops = ops_for(provider, "kv_pack")

    def block(q, k, v, meta):
        return ops.masked_attention(q, k, v, meta) * 2

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    meta = ops.build_mask_meta(mask)
    torch.testing.assert_close(compiled(q, k, v, meta).float(), block(q, k, v, meta).float(), rtol=RTOL, atol=ATOL)
    cross = cross_inputs(mask.shape[0], 512, mask.shape[1], 2)
    torch.testing.assert_close(compiled(*cross, meta).float(), block(*cross, meta).float(), rtol=RTOL, atol=ATOL)


def test_cuda_graphs_under_torch_compile_follow_each_new_mask(provider):
    """``mode="reduce-overhead"``: kv_pack's op is captured with the rest; each replay gets the new mask's
    metadata copied in, so masks of one shape with other valid counts and positions stay right."""
    ops = ops_for(provider, "kv_pack")
    masks = [text_image_mask([100, 37], text=128, image=1000, text_first=True),
             text_image_mask([20, 128], text=128, image=1000, text_first=True)]  # fmt: skip
    q, k, v = qkv(2, 1128)

    def block(q, k, v, meta):
        return ops.masked_attention(q * 2, k, v, meta) * 2

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(block, fullgraph=True, mode="reduce-overhead")
    outs = []
    for mask in masks + masks:
        meta = ops.build_mask_meta(mask.cuda())
        torch.compiler.cudagraph_mark_step_begin()
        got = compiled(q, k, v, meta).clone()
        torch.testing.assert_close(got.float(), block(q, k, v, meta).float(), rtol=RTOL, atol=ATOL)
        outs.append(got)
    assert not torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3])
    inductor = counters["inductor"]
    assert inductor["cudagraph_skips"] == 0 and inductor["cudagraph_partitions"] <= 1, dict(inductor)  # captured whole


@pytest.mark.parametrize("zeroing", [False, True])
def test_op_captured_with_copied_metadata_replays_new_masks(provider, zeroing):
    """Captured with copies of its metadata (as CUDA graph trees hand them): no sync breaks the capture, and
    a replay after a new mask's metadata is copied in computes the new mask. kv_pack runs its fast path in
    the graph (the same bytes as eager); qkv_pack (its counts on the host) runs SDPA with the key mask."""
    from attn_dispatch_varlen_diffusion import custom_ops

    ops = ops_for(provider, "qkv_pack" if zeroing else "kv_pack", pack_queries=False if zeroing else None)
    first = text_image_mask([100, 37], text=128, image=1000, text_first=True).cuda()
    second = text_image_mask([20, 128], text=128, image=1000, text_first=True).cuda()
    q, k, v = qkv(2, 1128)
    meta = ops.build_mask_meta(first)
    copies = [None if t is None else t.clone() for t in custom_ops._tensors_of(meta)]
    strategy = custom_ops._STRATEGIES.index(meta.strategy)

    def run():
        return custom_ops.op_for(meta.strategy)(
            q, k, v, *copies, strategy, meta.zero_masked_queries, meta.pack_queries, D**-0.5, ops._op_index
        )

    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()  # warm-up outside the capture (compiles the gather; qkv_pack rebuilds its metadata: syncs allowed)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for mask in (first, second, first):
        new_meta = ops.build_mask_meta(mask)
        for copy, tensor in zip(copies, custom_ops._tensors_of(new_meta)):
            if copy is not None:
                copy.copy_(tensor)
        graph.replay()
        want = ops.masked_attention(q, k, v, new_meta, softmax_scale=D**-0.5)
        if zeroing:
            torch.testing.assert_close(out.float(), want.float(), rtol=RTOL, atol=ATOL)
        else:
            assert torch.equal(out, want)
