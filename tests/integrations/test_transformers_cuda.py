"""The transformers integration on the GPU with the real FA3 (sm90): a small Llama, left padded, through
padded plans (prefill), one-row pages over the caches (decode steps: Dynamic and Static cache, a row with
a hole) and the packed route (right padding), against ``sdpa`` on the valid positions."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

from attn_dispatch.integrations import transformers as integration  # noqa: E402

pytestmark = pytest.mark.cuda

# head_dim 64 (256 / 4), GQA 4/2: FA3's shapes
SMALL = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, vocab_size=512)


@pytest.fixture(scope="module")
def model():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("needs an sm90 GPU (FA3)")
    integration.use_ops(None)
    if integration.ops_for(torch.device("cuda")) is None:
        pytest.skip("no attention plugin active on this GPU")
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=3, **SMALL)
    with torch.device("cuda"):
        built = AutoModelForCausalLM.from_config(config, attn_implementation="attn_dispatch", dtype=torch.bfloat16)
    return built.eval()


def batch(padding: str):
    """Four prompts of 61, 40, 17 and 3 tokens, padded to 61 on the left or the right."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 512, (4, 61), generator=generator)
    mask = torch.zeros_like(ids)
    for row, n in enumerate((61, 40, 17, 3)):
        if padding == "left":
            mask[row, 61 - n :] = 1
        else:
            mask[row, :n] = 1
    return ids.masked_fill(mask == 0, 0).cuda(), mask.cuda()


def logits(model, impl: str, ids, mask) -> torch.Tensor:
    model.set_attn_implementation(impl)
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask).logits.float()


@pytest.mark.parametrize("padding", ["left", "right"])
def test_prefill_matches_sdpa_on_valid_positions(model, padding):
    ids, mask = batch(padding)
    before = (integration.stats.plans, integration.stats.padded_plans)
    ours = logits(model, "attn_dispatch", ids, mask)
    plans, padded = integration.stats.plans - before[0], integration.stats.padded_plans - before[1]
    assert (plans, padded) == ((1, 1) if padding == "left" else (1, 0))  # left padding read in place
    theirs = logits(model, "sdpa", ids, mask)
    valid = mask.bool()
    torch.testing.assert_close(ours[valid], theirs[valid], atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("cache", [None, "static", "holes"])
def test_decode_steps_match_sdpa(model, cache):
    """generate's scores (prefill, then decode steps over the cache) agree with sdpa's while the tokens do:
    FA3 reading transformers' caches in place as one-row pages. With a StaticCache on CUDA, generate
    compiles the decode forward (where this integration hands every call to sdpa), so the test turns that
    off. "holes": padding inside a row, which the prefill leaves to sdpa and the decode steps compute."""
    ids, mask = batch("left")
    holes, cache = cache == "holes", None if cache == "holes" else cache
    if holes:
        mask[0, 30:35] = 0
    extra = {} if cache is None else {"cache_implementation": cache, "disable_compile": True}
    scores = {}
    for impl in ("attn_dispatch", "sdpa"):
        model.set_attn_implementation(impl)
        before = (integration.stats.padded_plans, integration.stats.paged_plans)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                output_scores=True, return_dict_in_generate=True, **extra,
            )  # fmt: skip
        scores[impl] = (out.sequences[:, ids.shape[1] :], [s.float() for s in out.scores])
        if impl == "attn_dispatch":  # a padded plan for the prefill (unless it has holes), pages for the 3 steps
            after = (integration.stats.padded_plans, integration.stats.paged_plans)
            assert (after[0] - before[0], after[1] - before[1]) == (0 if holes else 1, 3)
    (ours_tokens, ours), (their_tokens, theirs) = scores["attn_dispatch"], scores["sdpa"]
    for step, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2, msg=f"step {step}")
        if not torch.equal(ours_tokens[:, step], their_tokens[:, step]):
            break  # a near tie went the other way: later steps see other tokens
