"""The ``attn_dispatch`` diffusers backend: registration, selection, version gate, and every fallback
byte-identical to diffusers' native backend."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from diffusers_models import qwen_inputs, stand_in_ops, tiny_qwen
from diffusers.models.attention_dispatch import (
    AttentionBackendName,
    _AttentionBackendRegistry,
    attention_backend,
    dispatch_attention_fn,
)

import attn_dispatch.integrations.diffusers as ad

NATIVE = AttentionBackendName.NATIVE


@pytest.fixture
def ops():
    counting, provider_calls = stand_in_ops()
    ad.use_ops(counting)
    yield counting, provider_calls
    ad.use_ops(None)
    _AttentionBackendRegistry.set_active_backend(NATIVE)


def test_registered_under_its_name():
    member = AttentionBackendName("attn_dispatch")
    assert member is AttentionBackendName.ATTN_DISPATCH is ad.ATTN_DISPATCH
    assert member.value == "attn_dispatch" and member in list(AttentionBackendName)
    assert member in _AttentionBackendRegistry.list_backends()
    assert ad.register() is member  # idempotent


def test_set_attention_backend_selects_it(ops):
    counting, _ = ops
    model = tiny_qwen()
    model.set_attention_backend("attn_dispatch")
    assert all(p._attention_backend is ad.ATTN_DISPATCH for p in model.attn_processors.values())
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        model(**qwen_inputs(mask))
    assert counting.calls == 2  # both blocks, no scope: metadata built per call
    assert counting.builds == 2


def test_context_manager_selects_it(ops):
    counting, _ = ops
    q = k = v = torch.randn(1, 6, 2, 16, dtype=torch.bfloat16)
    mask = torch.tensor([[True] * 4 + [False] * 2])
    with attention_backend("attn_dispatch"):
        assert _AttentionBackendRegistry.get_active_backend()[0] is ad.ATTN_DISPATCH
        dispatch_attention_fn(q, k, v, attn_mask=mask[:, None, None, :])
    assert counting.calls == 1


def test_other_diffusers_versions_are_refused(monkeypatch):
    ad.check_diffusers_version("0.42.1")
    ad.check_diffusers_version("0.42.0.dev0")
    for version in ("0.41.0", "0.43.0", "1.42.0"):
        with pytest.raises(ad.UnsupportedDiffusersVersion, match=version):
            ad.check_diffusers_version(version)
    import diffusers

    monkeypatch.setattr(diffusers, "__version__", "0.43.0")
    with pytest.raises(ad.UnsupportedDiffusersVersion, match="0.43.0"):
        ad.enable(tiny_qwen())


def test_import_on_another_version_fails_loudly():
    code = "import diffusers; diffusers.__version__ = '0.99.0'; import attn_dispatch.integrations.diffusers"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0
    assert "UnsupportedDiffusersVersion" in result.stderr and "0.99.0" in result.stderr


class FakePipeline:
    def __init__(self, **components):
        self.components = components


def test_enable_finds_a_pipelines_transformers(ops):
    first, second = tiny_qwen(), tiny_qwen()
    pipe = FakePipeline(transformer=first, transformer_2=second, text_encoder=torch.nn.Linear(2, 2), scheduler=object())
    assert ad.enable(pipe) == [first, second]
    assert ad.enable(pipe) == [first, second]  # idempotent: one pair of hooks
    assert len(first._forward_pre_hooks) == 1
    for model in (first, second):
        assert all(p._attention_backend is ad.ATTN_DISPATCH for p in model.attn_processors.values())
    ad.disable(pipe)
    assert not first._forward_pre_hooks and not first._forward_hooks
    assert all(p._attention_backend == NATIVE for p in first.attn_processors.values())


def test_enable_refuses_what_has_no_dispatcher_attention():
    with pytest.raises(ValueError, match="pipe_or_model"):
        ad.enable(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="pipe_or_model"):
        ad.enable(FakePipeline(text_encoder=torch.nn.Linear(2, 2)))


# ---- fallbacks: the native backend, called with the same arguments -----------------------------


def _run(backend, q, k, v, **kwargs):
    torch.manual_seed(123)  # dropout draws the same numbers on both paths
    try:
        return dispatch_attention_fn(q, k, v, backend=backend, **kwargs)
    except Exception as exc:  # native's own refusals must be the same on both paths
        return (type(exc), str(exc))


def _qkv(dtype=torch.bfloat16, s_q=6, s_k=6, heads=2, kv_heads=2, d=16):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, s_q, heads, d, generator=gen).to(dtype)
    k = torch.randn(2, s_k, kv_heads, d, generator=gen).to(dtype)
    v = torch.randn(2, s_k, kv_heads, d, generator=gen).to(dtype)
    return q, k, v


def _key_mask(s_k=6):
    mask = torch.ones(2, s_k, dtype=torch.bool)
    mask[0, -2:] = False
    return mask


FALLBACKS = {
    "no mask": lambda: (_qkv(), {}),
    "dropout": lambda: (_qkv(), {"attn_mask": _key_mask()[:, None, None, :], "dropout_p": 0.3}),
    "causal": lambda: (_qkv(), {"is_causal": True}),
    "causal with mask": lambda: (_qkv(), {"attn_mask": _key_mask()[:, None, None, :], "is_causal": True}),
    "return_lse": lambda: (_qkv(), {"attn_mask": _key_mask()[:, None, None, :], "attention_kwargs": {"return_lse": True}}),
    "additive float mask": lambda: (
        _qkv(), {"attn_mask": torch.zeros(2, 1, 1, 6, dtype=torch.bfloat16).masked_fill(~_key_mask()[:, None, None, :], float("-inf"))}
    ),
    "float32": lambda: (_qkv(torch.float32), {"attn_mask": _key_mask()[:, None, None, :]}),
    "head dim 12": lambda: (_qkv(d=12), {"attn_mask": _key_mask()[:, None, None, :]}),
    "head dim 264": lambda: (_qkv(d=264), {"attn_mask": _key_mask()[:, None, None, :]}),
    "per-query mask": lambda: (_qkv(), {"attn_mask": torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(1)) > 0.3}),
    "per-head mask": lambda: (_qkv(), {"attn_mask": _key_mask()[:, None, None, :].expand(2, 2, 1, 6)}),
    "GQA": lambda: (_qkv(heads=4, kv_heads=2), {"attn_mask": _key_mask()[:, None, None, :], "enable_gqa": True}),
}


@pytest.mark.parametrize("case", sorted(FALLBACKS))
def test_fallbacks_are_byte_identical_to_native(ops, case):
    _, provider_calls = ops
    (q, k, v), kwargs = FALLBACKS[case]()
    native = _run(NATIVE, q, k, v, **kwargs)
    ours = _run(ad.ATTN_DISPATCH, q, k, v, **kwargs)
    assert not provider_calls, "the fast path ran"
    if isinstance(native, tuple):
        assert ours == native
    else:
        assert torch.equal(ours, native)


def test_autograd_falls_back(ops):
    _, provider_calls = ops
    q, k, v = (x.requires_grad_() for x in _qkv())
    mask = _key_mask()[:, None, None, :]
    native = dispatch_attention_fn(q, k, v, attn_mask=mask, backend=NATIVE)
    ours = dispatch_attention_fn(q, k, v, attn_mask=mask, backend=ad.ATTN_DISPATCH)
    assert torch.equal(ours, native) and ours.requires_grad and not provider_calls


def test_context_parallel_goes_to_native_unchanged(ops, monkeypatch):
    _, provider_calls = ops
    seen = []

    def recording_native(**kwargs):
        seen.append(kwargs)
        return torch.zeros(1)

    monkeypatch.setitem(_AttentionBackendRegistry._backends, NATIVE, recording_native)
    q, k, v = _qkv()
    config = object()
    out = dispatch_attention_fn(q, k, v, attn_mask=_key_mask(), scale=0.3, backend=ad.ATTN_DISPATCH, parallel_config=config)
    assert torch.equal(out, torch.zeros(1)) and not provider_calls
    (kwargs,) = seen
    assert kwargs["_parallel_config"] is config and kwargs["query"] is q and kwargs["scale"] == 0.3


def test_fp32_model_is_byte_identical_to_native(ops):
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    inputs = qwen_inputs(mask, dtype=torch.float32)
    model = tiny_qwen(torch.float32)
    with torch.no_grad():
        native = model(**inputs).sample
        ad.enable(model)
        ours = model(**inputs).sample
    assert torch.equal(ours, native)
    assert ops[0].builds == 0  # fp32: the pre-hook builds nothing


def test_reference_devices_call_native_directly():
    """Where ``masked_attention`` resolved to the reference (this CPU), no metadata is built at all."""
    ad.use_ops(None)
    assert ad.ops_for(torch.device("cpu")) is None
    q, k, v = _qkv()
    mask = _key_mask()[:, None, None, :]
    assert torch.equal(
        dispatch_attention_fn(q, k, v, attn_mask=mask, backend=ad.ATTN_DISPATCH),
        dispatch_attention_fn(q, k, v, attn_mask=mask, backend=NATIVE),
    )


@pytest.mark.parametrize("form", ["[B, 1, 1, S_k]", "[B, S_k]"])
def test_key_padding_masks_take_the_fast_path(ops, form):
    counting, provider_calls = ops
    q, k, v = _qkv(s_q=5, s_k=6)  # cross-attention shape
    mask = _key_mask()
    mask = mask[:, None, None, :] if form.startswith("[B, 1") else mask
    native = dispatch_attention_fn(q, k, v, attn_mask=mask, backend=NATIVE)
    ours = dispatch_attention_fn(q, k, v, attn_mask=mask, backend=ad.ATTN_DISPATCH)
    assert counting.calls == 1 and counting.builds == 1
    assert len(provider_calls) == 1  # cross-attention runs the plugin, not its SDPA fallback
    torch.testing.assert_close(ours.float(), native.float(), rtol=1e-2, atol=2e-2)


def test_qkv_pack_strategy_runs_native_attention(monkeypatch, caplog):
    """An op group that zeroes masked query rows (qkv_pack) is never used: diffusers expects SDPA's rows."""
    import attn_dispatch
    import attn_dispatch.integrations.diffusers as ad

    class ZeroingGroup:
        class _Impl:
            general_strategy = "qkv_pack"

            def masked_attention(self, *args, **kwargs):  # pragma: no cover - must not be called
                raise AssertionError("the qkv_pack group must not run")

        masked_attention = _Impl().masked_attention
        resolutions = {"masked_attention": attn_dispatch.Resolution("masked_attention", "varlen_diffusion", "x")}

    ad.use_ops(None)
    monkeypatch.setattr(attn_dispatch.plugins, "load", lambda device=None, **kw: ZeroingGroup)
    with caplog.at_level("WARNING", logger="attn_dispatch"):
        assert ad.ops_for(torch.device("cpu")) is None
    assert "qkv_pack" in caplog.text


def test_op_group_cache_follows_reset(monkeypatch):
    """attn_dispatch.reset() reaches the backend: the next call loads again."""
    import attn_dispatch
    import attn_dispatch.integrations.diffusers as ad

    ad.use_ops(None)
    first = ad.ops_for(torch.device("cpu"))
    loads = []
    real = attn_dispatch.plugins.load
    monkeypatch.setattr(attn_dispatch.plugins, "load", lambda device=None, **kw: loads.append(device) or real(device, **kw))
    assert ad.ops_for(torch.device("cpu")) is first and loads == []
    attn_dispatch.reset()
    ad.ops_for(torch.device("cpu"))
    assert len(loads) == 1
