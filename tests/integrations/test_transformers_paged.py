"""``paged|attn_dispatch`` on CPU: transformers' continuous batching (``generate_batch``) on tiny random models,
attention through cuda_fa3's ``make_attention_plan``/``paged_attention_out`` over the CPU stand-in provider."""

from __future__ import annotations

import attn_dispatch_cuda_fa3
import pytest
import torch
import transformers
import transformers.generation.continuous_batching.cache as cb_cache
from fa3_torch_provider import make_torch_provider
from transformers import AutoModelForCausalLM, ContinuousBatchingConfig, Gemma2Config, GenerationConfig, LlamaConfig
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from attn_dispatch.integrations import transformers as integration
from attn_dispatch.integrations import transformers_paged as paged

# Collected only where transformers is installed (conftest.py).
SMALL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 128,
}


@pytest.fixture
def calls(monkeypatch):
    """cuda_fa3's ops over the stand-in provider, counted; a fixed memory budget (no psutil needed)."""
    monkeypatch.setattr(cb_cache, "get_device_and_memory_breakdown", lambda: (torch.device("cpu"), 8 << 30, 0, 0))
    provider, counters = make_torch_provider()
    ops = attn_dispatch_cuda_fa3.build_ops(provider)
    make_plan = ops["make_attention_plan"]

    def counted_plan(**kwargs):
        counters.log.append("plan")
        return make_plan(**kwargs)

    integration.use_ops({**ops, "make_attention_plan": counted_plan})
    monkeypatch.setattr(paged, "stats", paged.Stats())
    yield counters
    integration.use_ops(None)


def model(cfg, dtype=torch.bfloat16):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def generate(m, impl: str) -> tuple[dict, int]:
    """Greedy ``generate_batch`` of five prompts (3 to 14 tokens) with 4-slot pages and 16 tokens per step:
    chunked prefills, decode, and steps mixing both. Returns the tokens per request and the steps run."""
    m.set_attn_implementation(impl)
    steps = []
    hook = m.model.register_forward_pre_hook(lambda *_: steps.append(1))
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 128, (n,), generator=generator).tolist() for n in (5, 9, 3, 14, 7)]
    greedy = GenerationConfig(max_new_tokens=10, do_sample=False, eos_token_id=-1, pad_token_id=0)  # no EOS
    pages = ContinuousBatchingConfig(block_size=4, num_blocks=64, max_batch_tokens=16)
    try:
        out = m.generate_batch(prompts, generation_config=greedy, continuous_batching_config=pages)
    finally:
        hook.remove()
    return {rid: o.generated_tokens for rid, o in out.items()}, len(steps)


def record_paged_sdpa(monkeypatch, log: list) -> None:
    """Record every ``paged|sdpa`` call (the name's own, and this integration's fallback): layer, mask, output."""
    from transformers.integrations.sdpa_paged import sdpa_attention_paged_forward as original

    def recorder(module, query, key, value, attention_mask, **kwargs):
        out = original(module, query, key, value, attention_mask, **kwargs)
        mask = None if attention_mask is None else attention_mask.clone()
        log.append((module.layer_idx, mask, out[0].clone(), sorted(kwargs)))
        return out

    monkeypatch.setattr(paged, "sdpa_attention_paged_forward", recorder)
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "paged|sdpa", recorder)


def test_registered_under_its_name():
    assert ALL_ATTENTION_FUNCTIONS[paged.NAME] is paged.attention
    m = model(LlamaConfig(num_hidden_layers=1, **SMALL))
    m.set_attn_implementation("paged|attn_dispatch")
    assert m.config._attn_implementation == "paged|attn_dispatch"


def test_same_tokens_as_paged_sdpa_with_one_plan_per_step(calls):
    m = model(LlamaConfig(num_hidden_layers=3, **SMALL))
    reference, _ = generate(m, "paged|sdpa")
    ours, steps = generate(m, "paged|attn_dispatch")
    assert ours == reference
    assert steps >= 10 and paged.stats.fallback == 0
    assert paged.stats.fast == calls.fwd_with_metadata == 3 * steps  # every layer of every step: paged_attention_out
    assert calls.log.count("plan") == paged.stats.plans == calls.metadata == steps  # one plan per step, not per layer


def test_fallback_is_paged_sdpa_byte_identical(calls, monkeypatch):
    """fp32 (not FlashAttention's): every layer runs paged|sdpa with the very mask continuous batching builds
    for ``paged|sdpa`` (it builds none for this name), so masks, outputs and tokens are identical."""
    m = model(LlamaConfig(num_hidden_layers=2, **SMALL), dtype=torch.float32)
    runs = {}
    for impl in ("paged|sdpa", "paged|attn_dispatch"):
        log = []
        record_paged_sdpa(monkeypatch, log)
        runs[impl] = (*generate(m, impl), log)
    (tokens, steps, theirs), (ours_tokens, _, ours) = runs["paged|sdpa"], runs["paged|attn_dispatch"]
    assert ours_tokens == tokens and calls.fwd == 0 and paged.stats.plans == 0
    assert len(ours) == len(theirs) == paged.stats.fallback == 2 * steps
    for (layer, mask, out, keys), (layer_, mask_, out_, keys_) in zip(theirs, ours, strict=True):
        assert (layer, keys) == (layer_, keys_)
        assert mask.shape == mask_.shape and mask.dtype == mask_.dtype and torch.equal(mask, mask_)
        assert torch.equal(out, out_)


def test_sliding_layers_fall_back_full_layers_plan_once(calls, monkeypatch):
    """Gemma2 alternates sliding (ring-buffer cache: paged|sdpa) and full layers (one plan per step)."""
    cfg = Gemma2Config(
        num_hidden_layers=4, sliding_window=6, attn_logit_softcapping=None, final_logit_softcapping=None, **SMALL
    )
    m = model(cfg)
    logs = {}
    for impl in ("paged|sdpa", "paged|attn_dispatch"):
        logs[impl] = []
        record_paged_sdpa(monkeypatch, logs[impl])
        _, steps = generate(m, impl)
    assert paged.stats.fast == paged.stats.fallback == 2 * steps and calls.log.count("plan") == steps
    sliding = [entry for entry in logs["paged|sdpa"] if m.config.layer_types[entry[0]] == "sliding_attention"]
    assert [entry[0] for entry in logs["paged|attn_dispatch"]] == [entry[0] for entry in sliding]
    for (_, mask, _, _), (_, mask_, _, _) in zip(sliding, logs["paged|attn_dispatch"], strict=True):
        assert torch.equal(mask, mask_)  # the batch schedule does not depend on the tokens (no EOS)


def test_called_without_a_paged_cache_raises():
    q = torch.zeros(1, 4, 2, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="paged attention cache"):
        paged.attention(torch.nn.Module(), q, q[:, :2], q[:, :2], None)


def test_transformers_without_the_hook_raises(monkeypatch):
    monkeypatch.setattr(paged, "sdpa_attention_paged_forward", None)
    with pytest.raises(integration.UnsupportedTransformersVersion, match="continuous batching"):
        integration.register()
    monkeypatch.setattr(transformers, "__version__", "5.18.0")
    with pytest.raises(integration.UnsupportedTransformersVersion, match=r"5\.17\.x"):
        integration.register()  # the series check comes first
