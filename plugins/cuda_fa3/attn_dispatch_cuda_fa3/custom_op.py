"""The kernel call as a torch custom op, ``attn_dispatch_cuda_fa3::attention_out``, for torch.compile.

FA3's own op schemas return ``out`` aliased (``Tensor(a!)``), which functionalization cannot handle. This
op mutates ``out`` and returns nothing, so Inductor re-inplaces it (no clone of ``out``, no copy back).
Its body is the eager route: a :class:`~attn_dispatch_flash.FlashArgs` rebuilt from the op's plain
arguments, bound with :func:`.binding.bind_layer_call` and called. Eagerly the ops skip the op and call the
bound call directly, which saves the dispatcher's overhead for custom ops (150 µs per call seen on a CPU
test host outside inference mode). The op is registered directly (``attn_dispatch.direct_op``), not
through ``torch.library.custom_op``, whose Python wrapper runs on every call.

An op schema takes plain values only, so the provider, path and strict mode travel as a route number: an
index into this module's list of the (provider, original, strict) triples that ops objects were built for.
"""

from __future__ import annotations

from typing import Optional

import torch
from attn_dispatch import direct_op
from attn_dispatch_flash import FlashArgs, FlashProvider

from .binding import bind_layer_call

OP_NAMESPACE = "attn_dispatch_cuda_fa3"

_routes: list[tuple[FlashProvider, bool, bool]] = []


def route_number(provider: FlashProvider, original: bool, strict: bool = False) -> int:
    """The number the custom op knows ``(provider, original, strict)`` by (registered on first use)."""
    for number, (known, known_original, known_strict) in enumerate(_routes):
        if known is provider and known_original == original and known_strict == strict:
            return number
    _routes.append((provider, original, strict))
    return len(_routes) - 1


def call_attention_out(q, k, v, out, args: FlashArgs, route: int) -> None:
    """Run the custom op with ``args`` spread into its plain arguments (what a compiled graph records)."""
    left, right = args.window_size
    attention_out(
        q, k, v, out, args.cu_seqlens_q, args.cu_seqlens_k, args.seqused_q, args.seqused_k, args.page_table,
        args.leftpad_k, args.scheduler_metadata, args.max_seqlen_q, args.max_seqlen_k, args.softmax_scale, args.causal, left,
        right, args.softcap, args.num_splits, args.pack_gqa, route,
    )  # fmt: skip


# typing.Optional, not `X | None`: the custom op's schema is inferred from these annotations.
def _attention_out(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    cu_seqlens_q: Optional[torch.Tensor],
    cu_seqlens_k: Optional[torch.Tensor],
    seqused_q: Optional[torch.Tensor],
    seqused_k: Optional[torch.Tensor],
    page_table: Optional[torch.Tensor],
    leftpad_k: Optional[torch.Tensor],
    scheduler_metadata: Optional[torch.Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    num_splits: int,
    pack_gqa: Optional[bool],
    route: int,
) -> None:
    """Attention written into the first ``q.shape[0]`` rows of the engine's ``out`` (batch mode, 4D ``q``
    with ``leftpad_k``: into ``out`` as it is)."""
    provider, original, strict = _routes[route]
    args = FlashArgs(
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, seqused_q=seqused_q, seqused_k=seqused_k,
        page_table=page_table, leftpad_k=leftpad_k, scheduler_metadata=scheduler_metadata, max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k, softmax_scale=softmax_scale, causal=causal, window_size=(window_left, window_right),
        softcap=softcap, num_splits=num_splits, pack_gqa=pack_gqa,
    )  # fmt: skip
    tokens, heads, head_dim = q.shape[0], q.shape[-2], q.shape[-1]
    call = bind_layer_call(provider, args, original=original, shape=(heads, k.shape[-2], head_dim), strict=strict)
    call(q, k, v, out if q.dim() == 4 else out[:tokens].view(tokens, heads, v.shape[-1]))


def _attention_out_fake(q, k, v, out, *args) -> None:
    return None


attention_out = direct_op.register(
    f"{OP_NAMESPACE}::attention_out", _attention_out, fake=_attention_out_fake, mutates_args=("out",)
)
