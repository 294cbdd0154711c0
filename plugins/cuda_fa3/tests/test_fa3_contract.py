"""CPU: the host's bad-input cases (``attn_dispatch.bad_inputs``) on this plugin's ops over the torch
stand-in provider: every case raises the ValueError naming the argument the reference names, and nothing
is written. The GPU suite runs the same cases with the real FA3 (test_fa3_gpu.py)."""

from __future__ import annotations

import pytest
import torch
from attn_dispatch import OP_NAMES, reference
from attn_dispatch.bad_inputs import CASES, expect_refused
from attn_dispatch_cuda_fa3 import build_ops
from fa3_torch_provider import make_torch_provider

REFERENCE = {op: getattr(reference, op) for op in OP_NAMES}
OURS = ("make_attention_plan", "paged_attention_out", "varlen_attention_out")
VARIANTS = {
    "optimized": dict(),
    "original": dict(original=True),
    "copying provider": dict(writes_out=False),
}


def ops_for(variant: str) -> dict:
    options = dict(VARIANTS[variant])
    original = options.pop("original", False)
    return REFERENCE | build_ops(make_torch_provider(**options)[0], original=original)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case", [c for c in CASES if c.op in OURS], ids=lambda c: c.id)
def test_bad_input_is_refused_like_the_reference(case, variant):
    ops = ops_for(variant)
    expect_refused(ops, case, "cpu", torch.bfloat16)
