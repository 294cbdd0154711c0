"""Each original-path reference against a direct torch computation, one sequence at a time."""

import pytest
import torch
import torch.nn.functional as F

from attn_dispatch import AttentionParams, reference

torch.manual_seed(0)


def naive_attention(q, k, v, *, causal, window=(-1, -1), softcap=0.0, scale=None):
    """q [Lq, H, D], k/v [Lk, Hkv, D] of ONE sequence; bottom-right aligned masks; written plainly."""
    lq, heads, d = q.shape
    lk, kv_heads, _ = k.shape
    scale = d**-0.5 if scale is None else scale
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    out = torch.zeros(lq, heads, v.shape[-1])
    for i in range(lq):
        diag = i + lk - lq
        visible = [j for j in range(lk)
                   if (not causal or j <= diag)
                   and (window[0] < 0 or j >= diag - window[0])
                   and (window[1] < 0 or j <= diag + window[1])]  # fmt: skip
        if not visible:
            continue
        s = torch.einsum("hd,khd->hk", q[i].double(), k[visible].double()) * scale
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        out[i] = torch.einsum("hk,khd->hd", s.softmax(-1), v[visible].double()).float()
    return out


def cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("params", [AttentionParams(), AttentionParams(causal=False), AttentionParams(window_size=(3, 0)), AttentionParams(causal=False, window_size=(2, 1), softcap=5.0)])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 1), (6, 2)])
def test_varlen_matches_per_sequence_attention(params, heads, kv_heads):
    q_lens, k_lens = [3, 7, 1], [5, 7, 4]
    q = torch.randn(sum(q_lens) + 2, heads, 16)  # 2 padding rows past cu_seqlens_q[-1]
    k, v = torch.randn(sum(k_lens), kv_heads, 16), torch.randn(sum(k_lens), kv_heads, 16)
    out = torch.full((q.shape[0] + 2, heads * 16), 9.0)  # and 2 rows past q (a padded engine buffer)
    reference.varlen_attention_out(q, k, v, out, cu_seqlens_q=cu(q_lens), cu_seqlens_k=cu(k_lens), max_seqlen_q=7, max_seqlen_k=7, params=params)
    cq, ck = cu(q_lens), cu(k_lens)
    for b in range(3):
        want = naive_attention(q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]], causal=params.causal, window=params.window_size, softcap=params.softcap)
        torch.testing.assert_close(out[cq[b]:cq[b + 1]].view(-1, heads, 16), want, atol=1e-5, rtol=1e-5)
    assert (out[q.shape[0]:] == 9.0).all()  # rows past q untouched


def paged_inputs(cache_lens, q_lens, page_size=4, heads=4, kv_heads=2, d=8, layer_params=(AttentionParams(),)):
    max_pages = max((n + page_size - 1) // page_size for n in cache_lens)
    pages = len(cache_lens) * max_pages
    k_cache, v_cache = torch.randn(pages, page_size, kv_heads, d), torch.randn(pages, page_size, kv_heads, d)
    page_table = torch.randperm(pages).to(torch.int32).view(len(cache_lens), max_pages)
    plan = reference.make_attention_plan(
        cache_seqlens=torch.tensor(cache_lens, dtype=torch.int32), page_table=page_table, cu_seqlens_q=cu(q_lens),
        max_seqlen_q=max(q_lens), max_seqlen_k=max(cache_lens), page_size=page_size, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=d, dtype=torch.float32, layer_params=layer_params,
    )  # fmt: skip
    q = torch.randn(sum(q_lens), heads, d)
    return q, k_cache, v_cache, plan


@pytest.mark.parametrize("params", [AttentionParams(), AttentionParams(window_size=(2, 0)), AttentionParams(softcap=3.0)])
def test_paged_matches_gathered_contiguous_attention(params):
    cache_lens, q_lens = [9, 4, 13], [1, 3, 1]  # decode, extend, decode
    q, k_cache, v_cache, plan = paged_inputs(cache_lens, q_lens, layer_params=(params,))
    out = torch.full((sum(q_lens) + 3, 4, 8), 9.0)  # padded past q, 3-D
    assert reference.paged_attention_out(q, k_cache, v_cache, out, plan=plan, params=params) is out
    cq = cu(q_lens)
    for b, n in enumerate(cache_lens):
        k = k_cache[plan.page_table[b].long()].reshape(-1, 2, 8)[:n]
        v = v_cache[plan.page_table[b].long()].reshape(-1, 2, 8)[:n]
        want = naive_attention(q[cq[b]:cq[b + 1]], k, v, causal=params.causal, window=params.window_size, softcap=params.softcap)
        torch.testing.assert_close(out[cq[b]:cq[b + 1]], want, atol=1e-5, rtol=1e-5)
    assert (out[sum(q_lens):] == 9.0).all()


def test_paged_ignores_cache_slots_past_each_sequence():
    """Slots never written (an engine's torch.empty cache can hold NaN there) do not reach the answer: a
    zero probability times NaN would be NaN. FlashAttention never reads them either."""
    cache_lens, q_lens = [9, 4, 13], [1, 3, 1]
    q, k_cache, v_cache, plan = paged_inputs(cache_lens, q_lens)
    clean = reference.paged_attention_out(q, k_cache, v_cache, torch.empty(5, 4, 8), plan=plan)
    for b, n in enumerate(cache_lens):
        flat = plan.page_table[b].long()[:, None] * k_cache.shape[1] + torch.arange(k_cache.shape[1])
        unwritten = flat.reshape(-1)[n:]
        k_cache.view(-1, 2, 8)[unwritten] = float("nan")
        v_cache.view(-1, 2, 8)[unwritten] = float("nan")
    dirty = reference.paged_attention_out(q, k_cache, v_cache, torch.empty(5, 4, 8), plan=plan)
    assert torch.equal(dirty, clean)


def test_plan_is_plain_data_with_no_metadata():
    _, _, _, plan = paged_inputs([9, 4], [1, 1])
    assert not hasattr(plan, "metadata") and plan.provider == "reference" and plan.batch_size == 2


def test_plan_records_distinct_layer_params_in_order():
    sliding = AttentionParams(window_size=(2, 0))
    _, _, _, plan = paged_inputs([9, 4], [1, 1], layer_params=(sliding, AttentionParams(), sliding))
    assert plan.layer_params == (sliding, AttentionParams())
    _, _, _, plan = paged_inputs([9, 4], [1, 1], layer_params=sliding)  # a bare AttentionParams is one
    assert plan.layer_params == (sliding,)


@pytest.mark.parametrize(
    "change, arg",
    [
        (dict(out=torch.full((5, 33), 9.0)), "out"),  # wrong width
        (dict(out=torch.full((2, 32), 9.0)), "out"),  # fewer rows than tokens
        (dict(out=torch.full((32, 5), 9.0).t()), "out"),  # non-contiguous
        (dict(out=torch.full((5, 32), 9.0, dtype=torch.float16)), "out"),
        (dict(q=torch.randn(5, 3, 8)), "q"),  # heads do not match the plan
    ],
)
def test_paged_bad_input_names_the_argument_and_leaves_out_untouched(change, arg):
    q, k_cache, v_cache, plan = paged_inputs([9, 4, 13], [1, 3, 1])
    args = dict(q=q, out=torch.full((5, 32), 9.0)) | change
    before = args["out"].clone()
    with pytest.raises(ValueError, match=f"^{arg}:"):
        reference.paged_attention_out(args["q"], k_cache, v_cache, args["out"], plan=plan)
    assert torch.equal(args["out"], before)


@pytest.mark.parametrize(
    "change, arg",
    [
        (dict(page_table=torch.zeros(3, 2, dtype=torch.int32)), "page_table"),
        (dict(cache_seqlens=torch.tensor([4, 4], dtype=torch.int64)), "cache_seqlens"),
        (dict(cu_seqlens_q=cu([1, 1, 1])), "cu_seqlens_q"),
        (dict(num_kv_heads=3), "num_heads"),
    ],
)
def test_plan_bad_input_names_the_argument(change, arg):
    args = dict(
        cache_seqlens=torch.tensor([4, 4], dtype=torch.int32), page_table=torch.zeros(2, 2, dtype=torch.int32),
        cu_seqlens_q=cu([1, 1]), max_seqlen_q=1, max_seqlen_k=4, page_size=4, num_heads=4, num_kv_heads=2, head_dim=8,
    ) | change  # fmt: skip
    with pytest.raises(ValueError, match=f"^{arg}:"):
        reference.make_attention_plan(**args)


def test_mla_v_up_proj_is_bmm_transpose_flatten():
    attn_output, w_vc = torch.randn(7, 4, 32), torch.randn(4, 32, 16)
    got = reference.mla_v_up_proj(attn_output, w_vc)
    want = torch.stack([attn_output[:, h] @ w_vc[h] for h in range(4)], dim=1).reshape(7, 64)
    torch.testing.assert_close(got, want)
    assert got.is_contiguous() and got.shape == (7, 64)


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        (dict(w_vc=torch.zeros(4, 16, 8, dtype=torch.uint8), w_vc_scale=torch.zeros(4, 16, 1, dtype=torch.uint8)), "w_vc"),
        (dict(o_proj_weight_dtype=torch.float8_e4m3fn), "o_proj_weight_dtype"),
        (dict(w_vc=torch.randn(4, 31, 16)), "w_vc"),
    ],
)
def test_mla_v_up_proj_rejects_what_needs_aiter_or_does_not_fit(kwargs, arg):
    args = dict(w_vc=torch.randn(4, 32, 16)) | kwargs
    with pytest.raises(ValueError, match=f"^{arg}:"):
        reference.mla_v_up_proj(torch.randn(7, 4, 32), **args)


def test_mla_decode_query_concatenates_split_inputs():
    q_nope, q_rope = torch.randn(3, 4, 512), torch.randn(3, 4, 64)
    q_all, nope, rope = reference.mla_decode_query(q_nope, q_rope, num_heads=4, kv_lora_rank=512, decode_impl="aiter")
    assert torch.equal(q_all, torch.cat([q_nope, q_rope], dim=-1))
    assert torch.equal(nope, q_nope) and torch.equal(rope, q_rope)


def test_mla_decode_query_concatenates_a_concatenated_query_again():
    """The original backend re-concatenates the split views of q_cat: same bytes, a fresh tensor."""
    q_cat = torch.randn(3, 4 * 576)
    q_all, nope, rope = reference.mla_decode_query(q_cat, None, num_heads=4, kv_lora_rank=512, decode_impl="aiter")
    assert torch.equal(q_all, q_cat.view(3, 4, 576)) and q_all.data_ptr() != q_cat.data_ptr()
    assert nope.shape == (3, 4, 512) and rope.shape == (3, 4, 64)


def test_mla_query_for_backend_keeps_split_and_scales_nope_in_decode():
    q_nope, q_rope = torch.randn(3, 4, 512), torch.randn(3, 4, 64)
    original = q_nope.clone()
    q, rope = reference.mla_query_for_backend(q_nope, q_rope, is_decode=True, decode_impl="aiter", llama_4_scaling=0.5)
    assert q is q_nope and rope is q_rope
    assert torch.equal(q_nope, original * 0.5)
    reference.mla_query_for_backend(q_nope, q_rope, is_decode=False, decode_impl="aiter", llama_4_scaling=0.5)
    assert torch.equal(q_nope, original * 0.5)  # prefill: no scaling


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int32])
def test_masked_attention_is_sdpa_with_a_key_mask(mask_dtype):
    q, k, v = (torch.randn(2, 10, 3, 8) for _ in range(3))
    key_mask = torch.tensor([[1] * 10, [1] * 6 + [0] * 4]).to(mask_dtype)
    got = reference.masked_attention(q, k, v, reference.build_mask_meta(key_mask))
    want = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=key_mask.bool()[:, None, None, :]
    ).transpose(1, 2)
    assert torch.equal(got, want)


def test_masked_attention_float_mask_is_additive():
    q, k, v = (torch.randn(1, 6, 2, 8) for _ in range(3))
    bias = torch.tensor([[0.0, 0.0, -1e9, 0.0, 0.0, -1e9]])
    got = reference.masked_attention(q, k, v, reference.build_mask_meta(bias))
    keep = bias[0] == 0
    want = F.scaled_dot_product_attention(q[:, :, :].transpose(1, 2), k[:, keep].transpose(1, 2), v[:, keep].transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(got, want)


def test_masked_attention_mask_shape_must_match_keys():
    q = torch.randn(2, 10, 3, 8)
    with pytest.raises(ValueError, match="^mask_meta:"):
        reference.masked_attention(q, q, q, reference.build_mask_meta(torch.ones(2, 9, dtype=torch.bool)))


def sdpa_per_head(q, k, v, key_mask):
    """[B, S, H, D] SDPA with k/v heads repeated for GQA: what masked_attention means, spelled out."""
    group = q.shape[2] // k.shape[2]
    k, v = (t.repeat_interleave(group, dim=2).transpose(1, 2) for t in (k, v))
    return F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=key_mask[:, None, None, :]).transpose(1, 2)


@pytest.mark.parametrize("s_q, s_k, heads, kv_heads", [(10, 10, 4, 4), (7, 12, 4, 4), (10, 10, 4, 2), (5, 9, 6, 1)])
def test_masked_attention_takes_cross_attention_and_gqa(s_q, s_k, heads, kv_heads):
    q = torch.randn(2, s_q, heads, 8)
    k, v = torch.randn(2, s_k, kv_heads, 8), torch.randn(2, s_k, kv_heads, 8)
    key_mask = torch.arange(s_k)[None, :] < torch.tensor([[s_k], [s_k - 3]])
    got = reference.masked_attention(q, k, v, reference.build_mask_meta(key_mask))
    assert got.shape == (2, s_q, heads, 8)
    torch.testing.assert_close(got, sdpa_per_head(q, k, v, key_mask), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("flat", [False, True])
def test_mla_decode_query_takes_flattened_heads(flat):
    q_nope, q_rope = torch.randn(3, 4, 16), torch.randn(3, 4, 8)
    args = (q_nope.flatten(1), q_rope.flatten(1)) if flat else (q_nope, q_rope)
    q_all, _, _ = reference.mla_decode_query(*args, num_heads=4, kv_lora_rank=16, decode_impl="flashmla")
    assert torch.equal(q_all, torch.cat([q_nope, q_rope], dim=-1))
