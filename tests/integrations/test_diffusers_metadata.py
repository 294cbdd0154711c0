"""Mask metadata at most once per transformer forward, never stale, and the fast path's output against
diffusers' native masked forward (CPU stand-in provider under TRITON_INTERPRET=1)."""

from __future__ import annotations

import pytest
import torch
from diffusers_models import (
    CountingOps,
    prx_inputs,
    qwen_inputs,
    reference_ops,
    stand_in_ops,
    tiny_cross,
    tiny_prx,
    tiny_qwen,
)
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
from varlen_torch_provider import needs_interpreter

import attn_dispatch.integrations.diffusers as ad
from attn_dispatch.integrations import diffusers_scope

pytestmark = needs_interpreter
ATOL = 3e-2  # bf16 through two blocks; a stale mask moves the output by far more (checked below)


@pytest.fixture
def ops():
    counting, provider_calls = stand_in_ops()
    ad.use_ops(counting)
    yield counting, provider_calls
    ad.use_ops(None)
    _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)
    assert diffusers_scope._stack == []


def _mask(rows):
    return torch.tensor(rows, dtype=torch.bool)


def _native(model, inputs):
    backend = [p._attention_backend for p in model.attn_processors.values()]
    model.set_attention_backend("native")
    try:
        with torch.no_grad():
            return model(**inputs).sample.float()
    finally:
        for p, b in zip(model.attn_processors.values(), backend):
            p._attention_backend = b


def _ours(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample.float()


def test_qwen_builds_once_per_forward_and_matches_native(ops):
    counting, provider_calls = ops
    model = tiny_qwen(layers=3)
    ad.enable(model)
    inputs = qwen_inputs(_mask([[1, 1, 1, 1, 0, 0, 0], [0, 1, 1, 0, 1, 1, 1]]))
    out = _ours(model, inputs)
    assert counting.builds == 1 and counting.calls == 3 and len(provider_calls) == 3
    ref = _native(model, inputs)
    assert (out - ref).abs().max() <= ATOL * ref.abs().max()


# Each forward: a different mask; the metadata must follow it.
SEQUENCE = [
    ("prompt A", [[1, 1, 1, 1, 0, 0, 0]]),
    ("same shape, other contents", [[0, 0, 0, 1, 1, 1, 1]]),
    ("other text length", [[1, 1, 0, 0, 0]]),
    ("CFG batch, two masks", [[1, 1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0, 0]]),
    ("CFG batch, rows swapped", [[1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0]]),
    ("no padding", [[1, 1, 1, 1, 1, 1, 1]]),
    ("prompt A again", [[1, 1, 1, 1, 0, 0, 0]]),
]


def test_metadata_is_never_stale_across_forwards(ops):
    counting, _ = ops
    model = tiny_qwen()
    ad.enable(model)
    for step, (label, rows) in enumerate(SEQUENCE, start=1):
        mask = _mask(rows)
        inputs = qwen_inputs(mask, seed=7)  # same latents and text: only the mask changes
        out, ref = _ours(model, inputs), _native(model, inputs)
        assert counting.builds == step, label
        joint = torch.cat([mask, torch.ones(mask.shape[0], 16, dtype=torch.bool)], dim=1)
        used = counting.key_masks[-2:]  # both blocks of this forward
        assert all(torch.equal(m, joint) for m in used), f"{label}: a block used another forward's metadata"
        assert (out - ref).abs().max() <= ATOL * ref.abs().max(), label
        assert diffusers_scope._stack == []


def test_int_mask_is_normalised_like_the_model(ops):
    model = tiny_qwen()
    ad.enable(model)
    inputs = qwen_inputs(torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))  # int64, as pipelines pass it
    out, ref = _ours(model, inputs), _native(model, inputs)
    assert ops[0].builds == 1 and (out - ref).abs().max() <= ATOL * ref.abs().max()


def test_scope_is_closed_when_the_forward_raises(ops):
    model = tiny_qwen()
    ad.enable(model)
    inputs = qwen_inputs(_mask([[1, 1, 1, 0, 0]]))
    with torch.no_grad(), pytest.raises(AttributeError):
        model(**{**inputs, "timestep": None})  # fails inside forward, after the pre-hook
    assert diffusers_scope._stack == []
    out, ref = _ours(model, inputs), _native(model, inputs)
    assert (out - ref).abs().max() <= ATOL * ref.abs().max()


def test_without_enable_metadata_is_built_per_call(ops):
    counting, _ = ops
    model = tiny_qwen(layers=3)
    model.set_attention_backend("attn_dispatch")
    inputs = qwen_inputs(_mask([[1, 1, 1, 0, 0]]))
    out = _ours(model, inputs)
    assert counting.builds == 3 and counting.calls == 3
    ref = _native(model, inputs)
    assert (out - ref).abs().max() <= ATOL * ref.abs().max()


def test_a_replaced_processor_gets_no_precomputed_metadata(ops):
    counting, _ = ops
    model = tiny_qwen()
    ad.enable(model)

    class Wrapped(type(model.transformer_blocks[0].attn.processor)):
        pass

    model.transformer_blocks[1].attn.set_processor(Wrapped())
    model.transformer_blocks[1].attn.processor._attention_backend = ad.ATTN_DISPATCH
    _ours(model, qwen_inputs(_mask([[1, 1, 1, 0, 0]])))
    assert counting.builds == 2  # no joint recipe: each block's new mask object is built


def test_cross_attention_reuses_one_mask_object(ops):
    counting, provider_calls = ops
    model = tiny_cross()
    ad.enable(model)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 10, 64, generator=gen).bfloat16()
    text = torch.randn(2, 7, 64, generator=gen).bfloat16()
    mask = _mask([[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0]])
    model.set_attention_backend("native")
    with torch.no_grad():
        ref = model(hidden, text, mask).float()
    ad.enable(model)
    with torch.no_grad():
        out = model(hidden, text, mask).float()
        assert counting.builds == 1 and counting.calls == 3  # three blocks, one mask object
        assert len(provider_calls) == 3  # cross-attention ran the plugin, not its SDPA fallback
        model(hidden, text, mask.clone())  # a new object: a new build
        assert counting.builds == 2
        mask[0, 4] = True  # same object, changed in place: _version moved, so a new build
        changed = model(hidden, text, mask).float()
        assert counting.builds == 3
    assert (out - ref).abs().max() <= ATOL * ref.abs().max()
    assert (changed - out).abs().max() > 0


def test_scope_identity_lookup():
    scope = diffusers_scope.ForwardScope(torch.nn.Linear(1, 1), None)
    mask = torch.ones(2, 5, dtype=torch.bool)
    meta = object()
    scope.remember(mask, meta)
    assert scope.lookup(mask) is meta
    assert scope.lookup(mask[:, None, None, :][:, 0, 0, :]) is meta  # a view of the same memory
    assert scope.lookup(mask.clone()) is None
    mask[0, 0] = False
    assert scope.lookup(mask) is None  # written in place


def test_prx_cross_attention_runs_the_fast_path(ops):
    """PRX: image queries over [text, image] keys (S_q != S_k) with a text padding mask."""
    counting, provider_calls = ops
    model = tiny_prx()
    ad.enable(model)
    inputs = prx_inputs(_mask([[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0]]))
    out = _ours(model, inputs)
    assert counting.builds == 1 and counting.calls == 2
    assert len(provider_calls) == 2
    ref = _native(model, inputs)
    assert (out - ref).abs().max() <= ATOL * ref.abs().max()


def test_compiled_model_builds_once_per_forward_without_graph_breaks():
    """Compiled (aot_eager): the hooks run eagerly, attention traces whole, one graph for every mask."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    counting = reference_ops()  # traceable op group: the original path
    ad.use_ops(counting)
    try:
        torch._dynamo.reset()
        counters.clear()
        model = tiny_qwen()
        native = tiny_qwen()
        ad.enable(model)
        native.set_attention_backend("native")
        compiled = torch.compile(model, backend="aot_eager")
        for step, rows in enumerate(([[1, 1, 1, 0, 0]], [[0, 1, 1, 1, 1]], [[1, 0, 0, 0, 0]]), start=1):
            inputs = qwen_inputs(_mask(rows))
            with torch.no_grad():
                out, ref = compiled(**inputs).sample, native(**inputs).sample
            assert counting.builds == step
            assert torch.equal(out, ref)  # SDPA with the same bool mask, traced
        assert not counters["graph_break"]
        assert counters["stats"]["unique_graphs"] == 1
        assert diffusers_scope._stack == []
    finally:
        ad.use_ops(None)
        _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)
        torch._dynamo.reset()


def test_compiled_model_with_the_plugin_op_matches_native():
    """Compiled (aot_eager) with the plugin's op group over the stand-in provider."""
    import torch._dynamo

    counting, provider_calls = stand_in_ops()
    ad.use_ops(counting)
    try:
        torch._dynamo.reset()
        model = tiny_qwen()
        ad.enable(model)
        inputs = qwen_inputs(_mask([[1, 1, 1, 1, 0, 0, 0], [0, 1, 1, 0, 1, 1, 1]]))
        with torch.no_grad():
            out = torch.compile(model, backend="aot_eager")(**inputs).sample.float()
        assert counting.builds == 1 and len(provider_calls) == 2
        ref = _native(model, inputs)
        assert (out - ref).abs().max() <= ATOL * ref.abs().max()
    finally:
        ad.use_ops(None)
        _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)
        torch._dynamo.reset()


def test_compiled_model_without_recipe_runs_native_attention():
    """No joint recipe and no tensor identity in traced code: masked calls trace as native, unbroken."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    counting = reference_ops()
    ad.use_ops(counting)
    try:
        torch._dynamo.reset()
        counters.clear()
        model, native = tiny_cross(), tiny_cross()
        ad.enable(model)
        native.set_attention_backend("native")
        gen = torch.Generator().manual_seed(0)
        hidden = torch.randn(2, 10, 64, generator=gen).bfloat16()
        text = torch.randn(2, 7, 64, generator=gen).bfloat16()
        mask = _mask([[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0]])
        with torch.no_grad():
            out = torch.compile(model, backend="aot_eager")(hidden, text, mask)
            assert torch.equal(out, native(hidden, text, mask))
        assert counting.builds == 0 and not counters["graph_break"]
    finally:
        ad.use_ops(None)
        _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)
        torch._dynamo.reset()


def _joint(mask, image_tokens=16):
    return torch.cat([mask.bool(), torch.ones(mask.shape[0], image_tokens, dtype=torch.bool)], dim=1)


def test_a_pipelines_repeated_masks_are_built_once(ops):
    """Denoising steps pass the same cond / uncond mask tensors again: metadata is reused, and follows
    any in-place edit."""
    counting, _ = ops
    model = tiny_qwen()
    ad.enable(model)
    cond = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])  # int64, as the pipeline passes it
    uncond = torch.tensor([[1, 1, 0, 0, 0, 0, 0]])
    for step in range(3):
        for mask in (cond, uncond):
            inputs = qwen_inputs(mask, seed=step)
            out, ref = _ours(model, inputs), _native(model, inputs)
            assert all(torch.equal(m, _joint(mask)) for m in counting.key_masks[-2:])
            assert (out - ref).abs().max() <= ATOL * ref.abs().max()
    assert counting.builds == 2
    cond[0, 5] = 1  # written in place: _version moves
    _ours(model, qwen_inputs(cond))
    assert counting.builds == 3 and all(torch.equal(m, _joint(cond)) for m in counting.key_masks[-2:])
    assert len(model._attn_dispatch_scope.memo) <= diffusers_scope.MEMO_SIZE


def test_reuse_across_forwards_can_be_switched_off(ops):
    counting, _ = ops
    model = tiny_qwen()
    ad.enable(model, reuse_across_forwards=False)
    inputs = qwen_inputs(_mask([[1, 1, 1, 0, 0]]))
    for _ in range(3):
        _ours(model, inputs)
    assert counting.builds == 3


def test_memo_is_bounded(ops):
    model = tiny_qwen()
    ad.enable(model)
    for n in range(1, 7):
        _ours(model, qwen_inputs(_mask([[1] * n + [0] * (7 - n)])))
    assert ops[0].builds == 6 and len(model._attn_dispatch_scope.memo) == diffusers_scope.MEMO_SIZE


def test_inference_mode_masks_are_never_reused_by_identity(ops):
    """Tensors made under torch.inference_mode have no version counter: each forward builds its own
    metadata (once), so an in-place edit of such a mask is still followed."""
    counting, _ = ops
    model = tiny_qwen()
    ad.enable(model)
    with torch.inference_mode():
        mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
        inputs = qwen_inputs(mask)
        out = model(**inputs).sample.float()
        assert counting.builds == 1
        mask[0, 1:] = 0  # in place, invisible to _version on an inference tensor
        model(**inputs)
    assert counting.builds == 2 and all(torch.equal(m, _joint(mask)) for m in counting.key_masks[-2:])
    assert model._attn_dispatch_scope.memo == []
    ref = _native(model, qwen_inputs(torch.tensor([[1, 1, 1, 1, 1, 0, 0]])))
    assert (out - ref).abs().max() <= ATOL * ref.abs().max()


def test_scopes_are_per_thread():
    """An eager forward in another thread never sees this thread's scope (its metadata could be another mask's)."""
    import threading

    from attn_dispatch.integrations import diffusers_scope as scope

    mine = scope.ForwardScope(torch.nn.Linear(1, 1), None)
    scope._stack.append(mine)
    try:
        seen = []
        worker = threading.Thread(target=lambda: seen.append(scope.current()))
        worker.start()
        worker.join()
        assert seen == [None]
        assert scope.current() is mine
    finally:
        scope._stack.remove(mine)
