"""Mask elision: with a joint-mask recipe the scope hands the model no text mask, and the backend masks
its attention calls from the forward's joint metadata. Same output as the model building its own mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
from diffusers_models import prx_inputs, qwen_inputs, reference_ops, stand_in_ops, tiny_prx, tiny_qwen
from varlen_torch_provider import needs_interpreter

import attn_dispatch.integrations.diffusers as ad
from attn_dispatch.integrations import diffusers_scope

ATOL = 3e-2  # bf16 through two blocks (as test_diffusers_metadata)
MASK = [[1, 1, 1, 1, 0, 0, 0], [0, 1, 1, 0, 1, 1, 1]]


@pytest.fixture
def reference():
    """The original path as the op group: SDPA with the bool mask, so outputs must be the same bytes."""
    counting = reference_ops()
    ad.use_ops(counting)
    yield counting
    ad.use_ops(None)
    _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)
    assert diffusers_scope._stack == []


def _mask(rows):
    return torch.tensor(rows, dtype=torch.bool)


def _masks_seen_by_blocks(model, run) -> list:
    """The text mask each transformer block was handed during ``run()``."""
    seen = []
    handles = [
        block.register_forward_pre_hook(lambda m, a, k: seen.append(k.get("encoder_hidden_states_mask")), with_kwargs=True)
        for block in model.transformer_blocks
    ]  # fmt: skip
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _forward(model, inputs, *args):
    with torch.no_grad():
        return model(*args, **inputs).sample


@pytest.mark.parametrize("elide", [True, False])
def test_elided_or_kept_the_output_is_the_native_bytes(reference, elide):
    model, native = tiny_qwen(layers=3), tiny_qwen(layers=3)
    ad.enable(model, elide_model_mask=elide)
    native.set_attention_backend("native")
    inputs = qwen_inputs(_mask(MASK))
    out = []
    seen = _masks_seen_by_blocks(model, lambda: out.append(_forward(model, inputs)))
    if elide:
        assert seen == [None, None, None]
    else:
        assert all(isinstance(m, torch.Tensor) for m in seen) and len(seen) == 3
    assert reference.builds == 1 and reference.calls == 3
    assert torch.equal(out[0], _forward(native, inputs))


def test_a_positional_mask_is_elided_too(reference):
    model, native = tiny_qwen(), tiny_qwen()
    ad.enable(model)
    native.set_attention_backend("native")
    inputs = qwen_inputs(_mask(MASK))
    positional = [inputs.pop(name) for name in ("hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask")]
    out = []
    seen = _masks_seen_by_blocks(model, lambda: out.append(_forward(model, inputs, *positional)))
    assert seen == [None, None]
    assert torch.equal(out[0], _forward(native, inputs, *positional))


def test_a_mask_the_model_would_refuse_is_passed_on(reference):
    """Not [B, L_txt]: the model gets it and raises its own error, as without attn_dispatch."""
    model, native = tiny_qwen(), tiny_qwen()
    ad.enable(model)
    native.set_attention_backend("native")
    inputs = qwen_inputs(_mask(MASK))
    inputs["encoder_hidden_states_mask"] = _mask([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])  # one token short
    with pytest.raises(ValueError) as ours:
        _forward(model, inputs)
    with pytest.raises(ValueError) as theirs:
        _forward(native, inputs)
    assert str(ours.value) == str(theirs.value)


def test_no_elision_once_the_model_is_switched_back_to_native(reference):
    model, native = tiny_qwen(), tiny_qwen()
    ad.enable(model)
    model.set_attention_backend("native")  # hooks still installed, backend no longer ours
    native.set_attention_backend("native")
    inputs = qwen_inputs(_mask(MASK))
    out = []
    seen = _masks_seen_by_blocks(model, lambda: out.append(_forward(model, inputs)))
    assert all(isinstance(m, torch.Tensor) for m in seen) and reference.builds == 0
    assert torch.equal(out[0], _forward(native, inputs))


def test_no_elision_with_context_parallel_processors(reference):
    model = tiny_qwen()
    ad.enable(model)
    model.transformer_blocks[1].attn.processor._parallel_config = object()
    kwargs = qwen_inputs(_mask(MASK))
    try:
        assert diffusers_scope._open_scope(model, (), kwargs) is None  # the model keeps its mask
        assert diffusers_scope.current().joint is None
    finally:
        diffusers_scope._close_scope(model, (), kwargs, None)


def _elided_scope(joint_mask: torch.Tensor):
    """A scope as the pre-hook opens it for an elided forward (over ``reference_ops``)."""
    meta = reference_ops().build_mask_meta(joint_mask)
    joint = diffusers_scope.JointMeta(
        joint_mask.shape[0], joint_mask.shape[1], joint_mask.device, meta, joint_mask[:, None, None, :], True
    )  # fmt: skip
    scope = diffusers_scope.ForwardScope(torch.nn.Linear(1, 1), joint)
    diffusers_scope._stack.append(scope)
    return scope


def test_maskless_calls_in_an_elided_forward(reference):
    """Joint keys: masked with the joint mask, through the fast path or (where it cannot run) diffusers'
    native attention; other keys: no mask, as the call was made."""
    gen = torch.Generator().manual_seed(0)
    joint = _mask([[1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 0, 1]])
    q, k, v = (torch.randn(2, 6, 2, 8, generator=gen).bfloat16() for _ in range(3))
    k_other, v_other = (torch.randn(2, 5, 2, 8, generator=gen).bfloat16() for _ in range(2))
    scope = _elided_scope(joint)
    try:
        masked = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), attn_mask=joint[:, None, None, :])
        assert torch.equal(ad._attn_dispatch_attention(q, k, v), masked.transpose(1, 2))
        assert reference.calls == 1  # the op group ran it
        fp32 = [x.float() for x in (q, k, v)]  # no fast path for fp32: native, with the joint mask
        masked32 = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in fp32), attn_mask=joint[:, None, None, :])
        assert torch.equal(ad._attn_dispatch_attention(*fp32), masked32.transpose(1, 2))
        plain = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k_other, v_other)))
        assert torch.equal(ad._attn_dispatch_attention(q, k_other, v_other), plain.transpose(1, 2))
        assert reference.calls == 1
    finally:
        diffusers_scope._stack.remove(scope)


@needs_interpreter
def test_elided_fast_path_matches_native():
    """The plugin's op group over the CPU stand-in provider: Qwen-Image and PRX, elided."""
    counting, provider_calls = stand_in_ops()
    ad.use_ops(counting)
    try:
        for make, inputs_for in ((tiny_qwen, qwen_inputs), (tiny_prx, prx_inputs)):
            model, native = make(), make()
            ad.enable(model)
            native.set_attention_backend("native")
            inputs = inputs_for(_mask(MASK))
            out = _forward(model, inputs).float()
            ref = _forward(native, inputs).float()
            assert (out - ref).abs().max() <= ATOL * ref.abs().max()
        assert counting.builds == 2 and len(provider_calls) == counting.calls > 0
    finally:
        ad.use_ops(None)
        _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)
    assert diffusers_scope._stack == []
