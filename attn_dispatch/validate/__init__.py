"""The argument rules of every op, one validator per op: the contract the reference and the plugins share.

Each ``validate_<op>`` takes the op's arguments, checks them on host metadata only (shapes, dtypes,
devices, strides, host ints; never a device sync, so it is safe per layer and under CUDA-graph capture)
and raises a ``ValueError`` whose message starts with the argument's name. Implementations call it
before they write anything, so bad input leaves ``out`` untouched on every device. Rules that need the
tensors' values (a device sync) are not checked; ``attn_dispatch.opspecs`` lists them per op.

What a validator returns is what its caller needs next (``out``'s row view, normalised plan arguments,
per-head views of the query), so implementations do not repeat the shape logic. Rules that belong to a
kernel, not to the op (FA3 runs fp16/bf16 only), stay with the plugin; the attention validators take
``dtypes=`` for the commonest such restriction so the error still names the argument the same way.
"""

from ..checks import FLOAT_DTYPES, INDEX_DTYPE
from .attention import (
    PlanArgs,
    check_packed_layer,
    check_planned,
    distinct_layer_params,
    validate_attention_run,
    validate_bind_attention,
    validate_make_attention_plan,
    validate_padded_run,
    validate_paged_attention_out,
    validate_varlen_attention_out,
)
from .masked import validate_build_mask_meta, validate_masked_attention
from .mla import validate_mla_decode_query, validate_mla_query_for_backend, validate_mla_v_up_proj

# One validator per op, by op name (attn_dispatch.opspecs builds the specs from this).
VALIDATORS = {
    "make_attention_plan": validate_make_attention_plan,
    "paged_attention_out": validate_paged_attention_out,
    "varlen_attention_out": validate_varlen_attention_out,
    "bind_attention": validate_bind_attention,
    "mla_v_up_proj": validate_mla_v_up_proj,
    "mla_query_for_backend": validate_mla_query_for_backend,
    "mla_decode_query": validate_mla_decode_query,
    "build_mask_meta": validate_build_mask_meta,
    "masked_attention": validate_masked_attention,
}

__all__ = [
    "FLOAT_DTYPES",
    "INDEX_DTYPE",
    "VALIDATORS",
    "PlanArgs",
    "check_packed_layer",
    "check_planned",
    "distinct_layer_params",
    "validate_attention_run",
    "validate_bind_attention",
    "validate_build_mask_meta",
    "validate_make_attention_plan",
    "validate_masked_attention",
    "validate_mla_decode_query",
    "validate_mla_query_for_backend",
    "validate_mla_v_up_proj",
    "validate_padded_run",
    "validate_paged_attention_out",
    "validate_varlen_attention_out",
]
