"""The transformers integration on CPU: a tiny Llama whose attention runs cuda_fa3's ops over the CPU
torch stand-in provider (FA3's interface and host checks, the reference's math; fp16/bf16 only, as FA3)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import attn_dispatch_cuda_fa3  # noqa: E402
from fa3_torch_provider import make_torch_provider  # noqa: E402
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig  # noqa: E402
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402

from attn_dispatch.integrations import transformers as integration  # noqa: E402

SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=128)


@pytest.fixture
def calls():
    """Inject cuda_fa3's ops over the stand-in provider; yield its call counters; undo after."""
    provider, counters = make_torch_provider()
    integration.use_ops(attn_dispatch_cuda_fa3.build_ops(provider))
    integration.stats.__init__()  # every counter back to zero (the module holds this very object)
    yield counters
    integration.use_ops(None)


def llama(layers: int = 2, dtype: torch.dtype = torch.bfloat16, **extra):
    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=layers, **SMALL, **extra)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="attn_dispatch", dtype=dtype).eval()


def left_padded_batch():
    """Three prompts of 12, 11 and 7 tokens, left padded to 12 (pad id 0)."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (3, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :1] = 0
    mask[2, :5] = 0
    return ids.masked_fill(mask == 0, 0), mask


def logits(model, impl: str, ids, mask, **kwargs):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kwargs).logits


def test_registered_under_its_name():
    assert ALL_ATTENTION_FUNCTIONS["attn_dispatch"] is integration.attn_dispatch_attention
    assert ALL_MASK_ATTENTION_FUNCTIONS["attn_dispatch"] is integration.attn_dispatch_mask
    model = llama()
    assert model.config._attn_implementation == "attn_dispatch"
    model.set_attn_implementation("sdpa")
    model.set_attn_implementation("attn_dispatch")
    assert model.config._attn_implementation == "attn_dispatch"


def test_padded_prefill_matches_sdpa_on_valid_positions(calls):
    model, (ids, mask) = llama(), left_padded_batch()
    ours = logits(model, "attn_dispatch", ids, mask)
    assert calls.fwd_into_out == 2  # both layers ran FlashAttention, into the output buffer
    reference = logits(model, "sdpa", ids, mask)
    valid = mask.bool()
    torch.testing.assert_close(ours[valid].float(), reference[valid].float(), atol=2e-2, rtol=2e-2)
    assert torch.equal(ours[:, -1].argmax(-1), reference[:, -1].argmax(-1))


def test_padding_is_never_attended(calls):
    """The mask function hands the attention the padding: what sits in padded slots changes nothing."""
    model, (ids, mask) = llama(), left_padded_batch()
    first = logits(model, "attn_dispatch", ids, mask)
    second = logits(model, "attn_dispatch", ids.masked_fill(mask == 0, 77), mask)
    assert torch.equal(first[mask.bool()], second[mask.bool()])


@pytest.mark.parametrize("cache", [None, "static"])
def test_greedy_generate_equals_sdpa(calls, cache):
    model, (ids, mask) = llama(), left_padded_batch()
    extra = {} if cache is None else {"cache_implementation": cache}
    results = {}
    for impl in ("attn_dispatch", "sdpa"):
        model.set_attn_implementation(impl)
        results[impl] = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0, **extra
        )
    assert calls.fwd == 5 * 2  # prefill and 4 decode steps, 2 layers each, all on the fast path
    assert torch.equal(results["attn_dispatch"], results["sdpa"])


@pytest.mark.parametrize("layers", [2, 4])
def test_metadata_built_once_per_forward(calls, layers):
    model, (ids, mask) = llama(layers), left_padded_batch()
    logits(model, "attn_dispatch", ids, mask)
    assert (integration.stats.builds, calls.fwd) == (1, layers)  # one build (one sync), reused by each layer
    # FA3's scheduler metadata: one packed plan per forward, handed to every layer's kernel call
    assert (integration.stats.plans, calls.metadata, calls.fwd_with_metadata) == (1, 1, layers)
    logits(model, "attn_dispatch", ids, mask)
    assert integration.stats.builds == 2  # a new forward, a new mask: built again, never reused stale
    assert (integration.stats.plans, calls.metadata) == (2, 2)


def right_padded_mask(ids):
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    return mask


def test_left_padded_forwards_read_q_k_v_in_place(calls, monkeypatch):
    """generate's left-padded prefill takes a padded plan and its decode steps one-row pages: no row
    movers, no pack, no scatter; one host build (the prefill's), the decode steps' made on the device."""
    from attn_dispatch.integrations import transformers_meta

    def no_movers(*args, **kwargs):
        raise AssertionError("a left-padded forward packed its rows")

    monkeypatch.setattr(transformers_meta, "RowMovers", no_movers)
    model, (ids, mask) = llama(), left_padded_batch()
    model.set_attn_implementation("attn_dispatch")
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    stats = integration.stats
    assert (stats.plans, stats.padded_plans, stats.paged_plans) == (4, 1, 3)  # one per forward
    assert (stats.builds, stats.device_builds) == (1, 3)
    assert calls.fwd == calls.fwd_with_metadata == 4 * 2


def test_padded_and_packed_routes_agree(calls, monkeypatch):
    """The same left-padded forward through the padded plan and, forced, through the packed one."""
    from attn_dispatch.integrations import transformers_meta

    model, (ids, mask) = llama(), left_padded_batch()
    padded = logits(model, "attn_dispatch", ids, mask)
    group = integration.ops_for(torch.device("cpu"))  # the injected op group, recorded as refusing padded plans
    monkeypatch.setitem(transformers_meta._no_padded_plans, id(group), group)
    packed = logits(model, "attn_dispatch", ids, mask)
    assert (integration.stats.plans, integration.stats.padded_plans) == (2, 1)
    valid = mask.bool()
    torch.testing.assert_close(padded[valid].float(), packed[valid].float(), atol=1e-2, rtol=1e-2)


def test_an_op_group_without_padded_plans_gets_packed_ones(calls):
    """An op group that refuses padded plans by naming key_starts (cuda_fa3 over FA4) is asked once; its
    forwards then run packed plans."""
    from types import SimpleNamespace

    from attn_dispatch.integrations import transformers_meta

    provider, _ = make_torch_provider()
    ops = attn_dispatch_cuda_fa3.build_ops(provider)
    refusals = []

    def make_attention_plan(**kwargs):
        if kwargs.get("key_starts") is not None:
            refusals.append(1)
            raise ValueError("key_starts: FA4 cannot read left-padded rows in place; make a packed plan")
        return ops["make_attention_plan"](**kwargs)

    group = SimpleNamespace(**{**ops, "make_attention_plan": make_attention_plan})
    integration.use_ops(group)
    try:
        model, (ids, mask) = llama(), left_padded_batch()
        first = logits(model, "attn_dispatch", ids, mask)
        logits(model, "attn_dispatch", ids, mask)
    finally:
        transformers_meta._no_padded_plans.pop(id(group), None)
    assert len(refusals) == 1 and integration.stats.padded_plans == 0 and integration.stats.plans == 2
    torch.testing.assert_close(first[mask.bool()].float(), logits(model, "sdpa", ids, mask)[mask.bool()].float(), atol=2e-2, rtol=2e-2)


def test_right_padded_batch_matches_sdpa(calls):
    model, (ids, _) = llama(), left_padded_batch()
    mask = right_padded_mask(ids)
    ours = logits(model, "attn_dispatch", ids, mask)
    assert calls.fwd == 2 and integration.stats.padded_plans == 0  # packed: padding after the valid tokens
    reference = logits(model, "sdpa", ids, mask)
    torch.testing.assert_close(ours[mask.bool()].float(), reference[mask.bool()].float(), atol=2e-2, rtol=2e-2)


def test_a_hole_in_a_row_falls_back_for_the_whole_forward(calls):
    """Valid tokens that are not one run per row are no bottom-right causal varlen batch: sdpa, unchanged,
    and the decision is made once (one build) for every layer."""
    model, (ids, _) = llama(), left_padded_batch()
    mask = torch.ones_like(ids)
    mask[0, 4:6] = 0
    results = {impl: logits(model, impl, ids, mask) for impl in ("attn_dispatch", "sdpa")}
    assert (calls.fwd, integration.stats.builds) == (0, 1)
    assert torch.equal(results["attn_dispatch"], results["sdpa"])


def test_unpadded_batch_needs_no_metadata(calls):
    model, (ids, _) = llama(), left_padded_batch()
    ours = logits(model, "attn_dispatch", ids, torch.ones_like(ids))
    assert (integration.stats.builds, calls.fwd) == (0, 2)
    torch.testing.assert_close(ours.float(), logits(model, "sdpa", ids, torch.ones_like(ids)).float(), atol=2e-2, rtol=2e-2)


def test_sliding_window_and_softcap_match_eager(calls):
    """Gemma-2 style: alternating sliding (window 4) and global layers, attention softcap (sdpa ignores it)."""
    torch.manual_seed(0)
    cfg = Gemma2Config(num_hidden_layers=2, head_dim=16, sliding_window=4, attn_logit_softcapping=5.0, **SMALL)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="attn_dispatch", dtype=torch.bfloat16).eval()
    ids, mask = left_padded_batch()
    ours = logits(model, "attn_dispatch", ids, mask)
    assert calls.fwd == 2 and integration.stats.builds == 2  # one build per mask (sliding, full)
    assert calls.metadata == calls.fwd_with_metadata == 2  # one plan per (mask, params), each layer reads its own
    reference = logits(model, "eager", ids, mask)
    torch.testing.assert_close(ours[mask.bool()].float(), reference[mask.bool()].float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize(
    "case", ["fp32", "output_attentions", "training_dropout", "reference_device"]
)
def test_fallbacks_are_sdpa_byte_for_byte(calls, case):
    ids, mask = left_padded_batch()
    model = llama(dtype=torch.float32 if case == "fp32" else torch.bfloat16, attention_dropout=0.5)
    kwargs = {"output_attentions": True} if case == "output_attentions" else {}
    if case == "training_dropout":
        model.train()
    if case == "reference_device":
        integration.use_ops(None)  # CPU: varlen_attention_out is the reference, so sdpa runs
    results = {}
    for impl in ("attn_dispatch", "sdpa"):
        model.set_attn_implementation(impl)
        torch.manual_seed(3)  # the same dropout draws for both
        with torch.no_grad():
            results[impl] = model(input_ids=ids, attention_mask=mask, **kwargs).logits
    assert calls.fwd == 0
    assert torch.equal(results["attn_dispatch"], results["sdpa"])


def test_an_unknown_mask_pattern_falls_back(calls):
    """A 4D mask this module did not make (here: the caller's own) goes to sdpa unchanged."""
    model, (ids, mask) = llama(), left_padded_batch()
    custom = torch.ones(3, 1, 12, 12, dtype=torch.bool).tril()
    results = {impl: logits(model, impl, ids, custom) for impl in ("attn_dispatch", "sdpa")}
    assert calls.fwd == 0
    assert torch.equal(results["attn_dispatch"], results["sdpa"])


def test_version_check():
    integration.check_transformers_version("5.17.0")
    integration.check_transformers_version("5.17.9")
    for version in ("5.16.2", "5.18.0", "4.57.1"):
        with pytest.raises(integration.UnsupportedTransformersVersion, match=version):
            integration.check_transformers_version(version)


def test_import_on_another_version_raises(monkeypatch):
    monkeypatch.setattr(transformers, "__version__", "5.18.0")
    with pytest.raises(integration.UnsupportedTransformersVersion, match="5.17.x"):
        integration.register()


def test_a_written_mask_is_not_looked_up():
    """Metadata follows the mask tensor's identity and version: an in-place write makes it unknown (sdpa)."""
    from attn_dispatch.integrations import transformers_meta

    _, padding = left_padded_batch()
    mask = integration.attn_dispatch_mask(batch_size=3, q_length=12, kv_length=12, attention_mask=padding.bool())
    record = transformers_meta.lookup(mask)
    assert record is not None and (record.q_offset, record.kv_offset, record.window) == (0, 0, None)
    assert transformers_meta.lookup(mask.clone()) is None
    mask[0, 0, 0, 0] = True
    assert transformers_meta.lookup(mask) is None


def test_inference_mode_forward_runs_the_fast_path(calls):
    """Masks made under torch.inference_mode() have no version counter; the forward must not crash on it."""
    model, (ids, mask) = llama(), left_padded_batch()
    model.set_attn_implementation("attn_dispatch")
    with torch.inference_mode():
        ours = model(input_ids=ids, attention_mask=mask).logits
    assert calls.fwd == 2  # both layers on the fast path
    assert torch.equal(ours, logits(model, "attn_dispatch", ids, mask))


def test_triton_row_movers_give_the_torch_routes_bytes(calls, monkeypatch):
    """The forward with the shared Triton row movers (interpreted here; what runs on CUDA) equals the
    forward with torch index ops, byte for byte."""
    import functools
    import os

    from attn_dispatch.integrations import transformers_meta, unpad

    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("the Triton route needs TRITON_INTERPRET=1 or a GPU")
    model, (ids, _) = llama(), left_padded_batch()
    mask = right_padded_mask(ids)  # a packed forward: the row movers run (a left-padded one reads in place)
    by_route = {}
    for route in ("torch", "triton"):
        monkeypatch.setattr(transformers_meta, "RowMovers", functools.partial(unpad.RowMovers, route=route))
        by_route[route] = logits(model, "attn_dispatch", ids, mask)
    assert calls.fwd == 4
    assert torch.equal(by_route["torch"], by_route["triton"])


def test_a_new_op_group_gets_its_own_plans(calls):
    """Plans cached across forwards (an unpadded batch's) belong to the op group that made them: a newly
    injected group runs its own kernels, even if it took the old group's id."""
    model, (ids, _) = llama(), left_padded_batch()
    full = torch.ones_like(ids)
    logits(model, "attn_dispatch", ids, full)
    assert calls.fwd == 2
    provider, other_calls = make_torch_provider()
    integration.use_ops(attn_dispatch_cuda_fa3.build_ops(provider))
    logits(model, "attn_dispatch", ids, full)
    assert (calls.fwd, other_calls.fwd) == (2, 2)
