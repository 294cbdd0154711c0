"""Op specs: one per op, and ``signature_problem`` refuses implementations the engine would call wrongly."""

import functools

import pytest
import torch

from attn_dispatch import DEFAULT_PARAMS, OP_NAMES, reference
from attn_dispatch.opspecs import SPECS, signature_problem
from attn_dispatch.validate import VALIDATORS


def test_every_op_has_one_spec_with_the_reference_signature_and_validator():
    assert set(SPECS) == set(OP_NAMES) == set(VALIDATORS)
    for op, spec in SPECS.items():
        assert spec.reference is getattr(reference, op) and spec.validator is VALIDATORS[op]
        assert signature_problem(op, spec.reference) is None
        assert spec.describe().startswith(f"{op}(")


def test_value_dependent_rules_are_stated():
    assert any("cache_seqlens" in rule for rule in SPECS["make_attention_plan"].host_unchecked)
    assert SPECS["varlen_attention_out"].host_unchecked


# Implementations of paged_attention_out(q, k_cache, v_cache, out, *, plan, params=DEFAULT_PARAMS,
# softmax_scale=None), right and wrong.
def paged_ok(q, k_cache, v_cache, out, *, plan, params=DEFAULT_PARAMS, softmax_scale=None): ...
def paged_keyword_order_differs(q, k_cache, v_cache, out, *, softmax_scale=None, params=DEFAULT_PARAMS, plan): ...
def paged_required_where_spec_has_none(q, k_cache, v_cache, out=None, *, plan=None, params=DEFAULT_PARAMS, softmax_scale=None): ...
def paged_plan_positional(q, k_cache, v_cache, out, plan, *, params=DEFAULT_PARAMS, softmax_scale=None): ...
def paged_renamed(q, k, v, out, *, plan, params=DEFAULT_PARAMS, softmax_scale=None): ...
def paged_missing_scale(q, k_cache, v_cache, out, *, plan, params=DEFAULT_PARAMS): ...
def paged_extra(q, k_cache, v_cache, out, *, plan, params=DEFAULT_PARAMS, softmax_scale=None, stream=None): ...
def paged_other_default(q, k_cache, v_cache, out, *, plan, params=None, softmax_scale=None): ...
def paged_no_default(q, k_cache, v_cache, out, *, plan, params, softmax_scale=None): ...
def paged_swapped(q, v_cache, k_cache, out, *, plan, params=DEFAULT_PARAMS, softmax_scale=None): ...
def paged_varargs(*args, **kwargs): ...
def paged_positional_only(q, k_cache, v_cache, out, /, *, plan, params=DEFAULT_PARAMS, softmax_scale=None): ...


class Plugin:
    def paged_attention_out(self, q, k_cache, v_cache, out, *, plan, params=DEFAULT_PARAMS, softmax_scale=None): ...


@functools.wraps(paged_ok)
def paged_wrapped(*args, **kwargs):
    return paged_ok(*args, **kwargs)


@pytest.mark.parametrize("fn", [paged_ok, paged_keyword_order_differs, paged_required_where_spec_has_none, Plugin().paged_attention_out, paged_wrapped])
def test_matching_signatures_pass(fn):
    assert signature_problem("paged_attention_out", fn) is None


@pytest.mark.parametrize(
    "fn, says",
    [
        (paged_plan_positional, "plan is positional-or-keyword, the spec's is keyword-only"),
        (paged_renamed, "missing k_cache, v_cache; unexpected k, v"),
        (paged_missing_scale, "missing softmax_scale"),
        (paged_extra, "unexpected stream"),
        (paged_other_default, "params defaults to None"),
        (paged_no_default, "params has no default"),
        (paged_swapped, "positional parameters in order q, v_cache, k_cache, out"),
        (paged_varargs, "takes *args"),
        (paged_positional_only, "q is positional-only"),
        (Plugin.paged_attention_out, "unexpected self"),  # the unbound function: self would take q
    ],
)
def test_differing_signatures_get_a_one_line_reason(fn, says):
    reason = signature_problem("paged_attention_out", fn)
    assert reason is not None and reason.startswith("paged_attention_out: ") and says in reason, reason
    assert "\n" not in reason and "the spec is paged_attention_out(q, k_cache, v_cache, out, *, plan" in reason


def test_unknown_op_and_unreadable_signature():
    assert "unknown op 'nope'" in signature_problem("nope", paged_ok)
    assert "cannot read" in signature_problem("masked_attention", object())


def test_tensor_defaults_compare_by_identity():
    def build_mask_meta(key_mask=torch.ones(1)): ...

    assert signature_problem("build_mask_meta", build_mask_meta) is None  # a default where the spec has none

    def v_up(attn_output, w_vc, *, w_vc_scale=torch.zeros(1), o_proj_weight_dtype=torch.bfloat16): ...

    assert "w_vc_scale defaults to tensor" in signature_problem("mla_v_up_proj", v_up)


def test_the_rocm_plugins_match_their_specs():
    from attn_dispatch_rocm_mxfp4 import make_v_up_proj
    from attn_dispatch_rocm_nsa import build_ops

    for op, fn in build_ops().items():
        assert signature_problem(op, fn) is None
    for strided in (True, False):
        assert signature_problem("mla_v_up_proj", make_v_up_proj(None, strided_output=strided)) is None
