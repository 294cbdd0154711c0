"""A FlashProvider made of torch, for CPU tests: FA3's interface and bookkeeping, the reference's math.

It behaves like FA3 where the plugin's correctness depends on it, and is stricter where FA3 is silent:
- ``scheduler_metadata`` returns an int32 tensor whose length depends on the batch and on causal/local
  (as FA3's does) and whose contents encode the batch and every scheduling input; ``fwd`` recomputes it
  for its own arguments and raises when the metadata it was handed was made for anything else (FA3 would
  read it wrongly without a word). A paged forward schedules for the ``max_seqlen_k`` it is given, like
  vllm's raw op, or with ``paged_seqlen_k_from_page_table=True`` for the page table's capacity, like the
  sgl_kernel and upstream wrappers.
- ``fwd`` first runs the host checks FA3's ``mha_fwd`` makes before it launches anything (dtypes, last-dim
  strides, ``out``'s shape, int32 ``cu_seqlens``, heads divisible) and raises RuntimeError like its
  ``TORCH_CHECK``s: the plugin leaves those to the kernel on its per-call path.
- ``writes_out=False`` mimics upstream FA3: passing ``out`` raises.
- ``calls`` counts metadata builds and forwards, so tests can see what each op launched.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch
from attn_dispatch import reference
from attn_dispatch_flash import FlashProvider
from attn_dispatch.plans import AttentionParams


@dataclass
class Calls:
    metadata: int = 0
    fwd: int = 0
    fwd_with_metadata: int = 0
    fwd_into_out: int = 0
    log: list[str] = field(default_factory=list)


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def _metadata(
    *, batch_size, max_seqlen_q, max_seqlen_k, num_heads, num_kv_heads, head_dim, head_dim_v,
    cache_seqlens, cu_seqlens_q, page_size, dtype, causal, window_size, softcap, num_splits, pack_gqa,
) -> torch.Tensor:  # fmt: skip
    key = (max_seqlen_q, max_seqlen_k, num_heads, num_kv_heads, head_dim, head_dim_v, page_size, str(dtype),
           bool(causal), tuple(window_size), softcap > 0, num_splits, pack_gqa)  # fmt: skip
    rows = _round_up(batch_size, 4)
    local = window_size[0] >= 0 or (window_size[1] >= 0 and not causal)
    sections = 3 if (causal or local) else 2  # FA3 adds num_nheads_in_l2 for causal/local
    device = cache_seqlens.device
    meta = torch.zeros(1 + sections * rows, dtype=torch.int32, device=device)
    meta[0] = zlib.crc32(repr(key).encode()) & 0x7FFFFFFF
    meta[1 : 1 + batch_size] = cache_seqlens
    meta[1 + rows : 1 + rows + batch_size] = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    if sections == 3:
        meta[1 + 2 * rows : 1 + 2 * rows + batch_size] = num_heads
    return meta


def _fa3_host_checks(q, k, v, out, cu_seqlens_q, cu_seqlens_k) -> None:
    """The TORCH_CHECKs of FA3's mha_fwd that the plugin relies on (its messages, abridged)."""

    def torch_check(ok: bool, message: str) -> None:
        if not ok:
            raise RuntimeError(message)

    torch_check(q.dtype in (torch.float16, torch.bfloat16), "FlashAttention only supports fp16, bf16 and fp8_e4m3")
    torch_check(k.dtype == q.dtype and v.dtype == q.dtype, "query and key/value must have the same dtype")
    for t in (q, k, v):
        torch_check(t.stride(-1) == 1, "Input tensor must have contiguous last dimension")
    torch_check(q.shape[-2] % k.shape[-2] == 0, "Number of heads in key/value must divide number of heads in query")
    for cu in (cu_seqlens_q, cu_seqlens_k):
        torch_check(cu is None or (cu.dtype == torch.int32 and cu.is_contiguous()), "cu_seqlens must have dtype int32")
    if out is not None:
        torch_check(out.dtype == q.dtype, "Output must have the same dtype as inputs")
        torch_check(out.device == q.device, "Output must be on the same device as inputs")  # CHECK_DEVICE(out)
        torch_check(out.stride(-1) == 1, "Output tensor must have contiguous last dimension")
        torch_check(out.shape == (*q.shape[:-1], v.shape[-1]), "out must have shape (total_q, num_heads, head_size_v)")


def make_torch_provider(
    *, writes_out: bool = True, metadata: bool = True, name: str = "torch_fa3", paged_seqlen_k_from_page_table: bool = False,
    version: str = "",
) -> tuple[FlashProvider, Calls]:
    calls = Calls()

    def scheduler_metadata(**kwargs) -> torch.Tensor:
        calls.metadata += 1
        return _metadata(**kwargs)

    def fwd(
        q, k, v, *, out=None, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None, seqused_k=None,
        max_seqlen_q, max_seqlen_k, page_table=None, softmax_scale, causal, window_size=(-1, -1),
        softcap=0.0, scheduler_metadata=None, num_splits=0, pack_gqa=None, leftpad_k=None,
    ):  # fmt: skip
        if leftpad_k is not None:
            raise NotImplementedError("leftpad_k: the stand-in computes packed and paged calls only")
        calls.fwd += 1
        _fa3_host_checks(q, k, v, out, cu_seqlens_q, cu_seqlens_k)
        if out is not None and not writes_out:
            raise TypeError(f"{name} cannot write into out")
        if seqused_q is not None:
            raise NotImplementedError("seqused_q")
        params = AttentionParams(causal=causal, window_size=tuple(window_size), softcap=softcap, num_splits=num_splits, pack_gqa=pack_gqa)
        tokens, heads, head_dim = q.shape
        # FA3 writes any out whose last dim is contiguous (a head slice, say); the reference wants it whole.
        whole = out is not None and out.is_contiguous()
        target = out if whole else torch.empty(tokens, heads, v.shape[-1], dtype=q.dtype, device=q.device)
        calls.fwd_into_out += out is not None
        _compute(
            q, k, v, target, page_table=page_table, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
            seqused_k=seqused_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, params=params,
            softmax_scale=softmax_scale, scheduler_metadata=scheduler_metadata,
        )  # fmt: skip
        if out is not None and not whole:
            out.copy_(target)
        return target if out is None else out

    def _compute(
        q, k, v, target, *, page_table, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, params,
        softmax_scale, scheduler_metadata,
    ):  # fmt: skip
        """The reference's answer into ``target`` (contiguous), checking the metadata as FA3 would read it."""
        tokens, heads, head_dim = q.shape
        causal, window_size, softcap = params.causal, params.window_size, params.softcap
        num_splits, pack_gqa = params.num_splits, params.pack_gqa
        if page_table is None:
            if scheduler_metadata is not None:  # a packed plan's: made from each sequence's key count
                calls.fwd_with_metadata += 1
                expected = _metadata(
                    batch_size=cu_seqlens_q.shape[0] - 1, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                    num_heads=heads, num_kv_heads=k.shape[1], head_dim=head_dim, head_dim_v=v.shape[-1],
                    cache_seqlens=cu_seqlens_k[1:] - cu_seqlens_k[:-1], cu_seqlens_q=cu_seqlens_q, page_size=None,
                    dtype=q.dtype, causal=causal, window_size=window_size, softcap=softcap, num_splits=num_splits,
                    pack_gqa=pack_gqa,
                )  # fmt: skip
                if scheduler_metadata.shape != expected.shape or not torch.equal(scheduler_metadata, expected):
                    raise AssertionError("scheduler metadata was made for another schedule (FA3 would misread it)")
            reference.varlen_attention_out(
                q, k, v, target, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                max_seqlen_k=max_seqlen_k, params=params, softmax_scale=softmax_scale,
            )  # fmt: skip
            return
        page_size = k.shape[1]
        if scheduler_metadata is not None:
            calls.fwd_with_metadata += 1
            expected = _metadata(
                batch_size=page_table.shape[0], max_seqlen_q=max_seqlen_q,
                max_seqlen_k=page_table.shape[1] * page_size if paged_seqlen_k_from_page_table else max_seqlen_k,
                num_heads=heads, num_kv_heads=k.shape[2], head_dim=head_dim, head_dim_v=v.shape[-1],
                cache_seqlens=seqused_k, cu_seqlens_q=cu_seqlens_q, page_size=page_size, dtype=q.dtype,
                causal=causal, window_size=window_size, softcap=softcap, num_splits=num_splits, pack_gqa=pack_gqa,
            )  # fmt: skip
            if scheduler_metadata.shape != expected.shape or not torch.equal(scheduler_metadata, expected):
                raise AssertionError("scheduler metadata was made for another schedule (FA3 would misread it)")
        plan = reference.make_attention_plan(
            cache_seqlens=seqused_k, page_table=page_table, cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k, page_size=page_size, num_heads=heads, num_kv_heads=k.shape[2],
            head_dim=head_dim, head_dim_v=v.shape[-1], dtype=q.dtype, layer_params=(params,),
        )  # fmt: skip
        reference.paged_attention_out(q, k, v, target, plan=plan, params=params, softmax_scale=softmax_scale)

    provider = FlashProvider(
        name, 3, fwd, scheduler_metadata if metadata else None, writes_out=writes_out, has_seqused_q=False,
        paged_seqlen_k_from_page_table=paged_seqlen_k_from_page_table, version=version,
    )  # fmt: skip
    return provider, calls
