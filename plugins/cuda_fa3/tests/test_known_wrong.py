"""The known-wrong table (issue 12's conformance finding) is looked up when a layer's call is bound."""

from __future__ import annotations

import logging

import pytest

from attn_dispatch import AttentionParams
from attn_dispatch_cuda_fa3 import known_wrong as kw
from attn_dispatch_cuda_fa3.stats import stats

LOCAL = AttentionParams(causal=True, window_size=(255, 0))


@pytest.mark.parametrize(
    "provider, head_dim, heads, kv_heads, params, suspect",
    [
        ("vllm_fa3", 256, 4, 4, LOCAL, True),
        ("vllm_fa3", 224, 8, 8, AttentionParams(causal=False, window_size=(64, 64)), True),
        ("vllm_fa3", 192, 4, 4, LOCAL, False),  # head dims <= 192 were right
        ("vllm_fa3", 256, 4, 2, LOCAL, False),  # GQA was right
        ("vllm_fa3", 256, 2, 2, LOCAL, False),  # two heads were right
        ("vllm_fa3", 256, 4, 4, AttentionParams(), False),  # no window
        ("sgl_kernel", 256, 4, 4, LOCAL, False),  # unverified build: not listed
    ],
)
def test_table(provider, head_dim, heads, kv_heads, params, suspect):
    reason = kw.known_wrong(provider, head_dim, heads, kv_heads, params)
    assert (reason is not None) == suspect
    if suspect:
        assert reason.startswith("known-wrong: vllm_fa3")


def test_warned_once_and_counted(caplog, monkeypatch):
    monkeypatch.setattr(kw, "_warned", set())
    before = stats.known_wrong_bindings
    with caplog.at_level(logging.WARNING, logger="attn_dispatch"):
        for _ in range(3):
            kw.warn_if_known_wrong("vllm_fa3", 256, 4, 4, LOCAL)
    assert stats.known_wrong_bindings == before + 3
    assert caplog.text.count("known-wrong") == 1


def test_ops_warn_when_binding_a_suspect_layer(caplog, monkeypatch):
    """Through the ops, with the CPU stand-in named as the suspect build: paged and varlen both warn at bind time."""
    import torch
    from fa3_batches import packed_batch, paged_batch
    from fa3_torch_provider import make_torch_provider

    from attn_dispatch_cuda_fa3 import build_ops

    monkeypatch.setattr(kw, "_warned", set())
    provider, _ = make_torch_provider(name="vllm_fa3")
    ops = build_ops(provider)
    batch = paged_batch(q_lens=[3, 2], k_lens=[9, 5], heads=4, kv_heads=4, head_dim=256)
    plan = ops["make_attention_plan"](**batch.plan_args, layer_params=(LOCAL,))
    out = torch.empty(batch.tokens, 4 * 256, dtype=torch.bfloat16)
    before = stats.known_wrong_bindings
    with caplog.at_level(logging.WARNING, logger="attn_dispatch"):
        for _ in range(2):  # the second layer looks the binding up: no second count
            ops["paged_attention_out"](batch.q, batch.k_cache, batch.v_cache, out, plan=plan, params=LOCAL)
        q, k, v, lengths = packed_batch(lens=[4, 3], heads=4, kv_heads=4, head_dim=256)
        ops["varlen_attention_out"](q, k, v, torch.empty(7, 4 * 256, dtype=torch.bfloat16), **lengths, params=LOCAL)
    assert stats.known_wrong_bindings == before + 2
    assert "known-wrong" in caplog.text
