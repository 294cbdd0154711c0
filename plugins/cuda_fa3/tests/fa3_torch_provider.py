"""A FlashProvider made of torch, for CPU tests: FA3's interface and bookkeeping, the reference's math.

It behaves like FA3 where the plugin's correctness depends on it, and is stricter where FA3 is silent:
- ``scheduler_metadata`` returns an int32 tensor whose length depends on the batch and on causal/local
  (as FA3's does) and whose contents encode the batch and every scheduling input; ``fwd`` recomputes it
  for its own arguments and raises when the metadata it was handed was made for anything else (FA3 would
  read it wrongly without a word). A paged forward schedules for the ``max_seqlen_k`` it is given, like
  vllm's raw op, or with ``paged_seqlen_k_from_page_table=True`` for the page table's capacity, like the
  sgl_kernel and upstream wrappers. A batch-mode forward (``leftpad_k``: ``[B, S, heads, d]`` tensors,
  each row's keys ``leftpad_k[b]:seqused_k[b]``) schedules for ``q.shape[0]`` rows of ``q.shape[1]``
  queries over ``k.shape[1]`` keys, each row's key count being its end minus its start, as FA3's does.
- ``fwd`` first runs the host checks FA3's ``mha_fwd`` makes before it launches anything (dtypes, last-dim
  strides, ``out``'s shape, int32 ``cu_seqlens``, heads divisible) and raises RuntimeError like its
  ``TORCH_CHECK``s: the plugin leaves those to the kernel on its per-call path.
- ``writes_out=False`` mimics upstream FA3: passing ``out`` raises; ``varlen_takes_metadata=False``
  mimics its ``flash_attn_varlen_func``: a packed forward handed metadata raises.
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
    leftpad_k=None,
) -> torch.Tensor:  # fmt: skip
    key = (max_seqlen_q, max_seqlen_k, num_heads, num_kv_heads, head_dim, head_dim_v, page_size, str(dtype),
           bool(causal), tuple(window_size), softcap > 0, num_splits, pack_gqa, leftpad_k is not None)  # fmt: skip
    rows = _round_up(batch_size, 4)
    local = window_size[0] >= 0 or (window_size[1] >= 0 and not causal)
    sections = 3 if (causal or local) else 2  # FA3 adds num_nheads_in_l2 for causal/local
    device = cache_seqlens.device
    meta = torch.zeros(1 + sections * rows, dtype=torch.int32, device=device)
    meta[0] = zlib.crc32(repr(key).encode()) & 0x7FFFFFFF
    # FA3 schedules each row for its key count: with leftpad_k, cache_seqlens are ends and the count end - start
    meta[1 : 1 + batch_size] = cache_seqlens if leftpad_k is None else cache_seqlens - leftpad_k
    # batch mode (no cu_seqlens_q): every row has max_seqlen_q queries
    meta[1 + rows : 1 + rows + batch_size] = max_seqlen_q if cu_seqlens_q is None else cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    if sections == 3:
        meta[1 + 2 * rows : 1 + 2 * rows + batch_size] = num_heads
    return meta


def _fa3_host_checks(q, k, v, out, cu_seqlens_q, cu_seqlens_k, leftpad_k=None) -> None:
    """The TORCH_CHECKs of FA3's mha_fwd that the plugin relies on (its messages, abridged); ``out`` is
    ``[total_q, heads, dv]``, or ``[B, S_q, heads, dv]`` in batch mode (4D ``q``)."""

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
    if leftpad_k is not None:
        torch_check(leftpad_k.dtype == torch.int32, "leftpad_k must have dtype int32")
        # the stand-in's batch mode only (FA3 also takes leftpad_k with varlen q; never with a page table)
        torch_check(q.dim() == 4 and k.dim() == 4 and k.shape[0] == q.shape[0], "batch_size must be equal to batch_size_k")
        torch_check(leftpad_k.shape == (q.shape[0],), "leftpad_k must have shape (batch_size)")
    if out is not None:
        torch_check(out.dtype == q.dtype, "Output must have the same dtype as inputs")
        torch_check(out.device == q.device, "Output must be on the same device as inputs")  # CHECK_DEVICE(out)
        torch_check(out.stride(-1) == 1, "Output tensor must have contiguous last dimension")
        torch_check(out.shape == (*q.shape[:-1], v.shape[-1]), "out must have shape (total_q, num_heads, head_size_v)")


def make_torch_provider(
    *, writes_out: bool = True, metadata: bool = True, name: str = "torch_fa3", paged_seqlen_k_from_page_table: bool = False,
    version: str = "", varlen_takes_metadata: bool = True,
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
        calls.fwd += 1
        _fa3_host_checks(q, k, v, out, cu_seqlens_q, cu_seqlens_k, leftpad_k)
        if out is not None and not writes_out:
            raise TypeError(f"{name} cannot write into out")
        if seqused_q is not None:
            raise NotImplementedError("seqused_q")
        if scheduler_metadata is not None and not varlen_takes_metadata and page_table is None and leftpad_k is None:
            raise NotImplementedError(f"{name}'s flash_attn_varlen_func takes no scheduler_metadata")
        params = AttentionParams(causal=causal, window_size=tuple(window_size), softcap=softcap, num_splits=num_splits, pack_gqa=pack_gqa)
        # FA3 writes any out whose last dim is contiguous (a head slice, say); the reference wants it whole.
        whole = out is not None and out.is_contiguous()
        target = out if whole else torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        calls.fwd_into_out += out is not None
        _compute(
            q, k, v, target, page_table=page_table, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
            seqused_k=seqused_k, leftpad_k=leftpad_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
            params=params, softmax_scale=softmax_scale, scheduler_metadata=scheduler_metadata,
        )  # fmt: skip
        if out is not None and not whole:
            out.copy_(target)
        return target if out is None else out

    def _compute(
        q, k, v, target, *, page_table, cu_seqlens_q, cu_seqlens_k, seqused_k, leftpad_k, max_seqlen_q, max_seqlen_k,
        params, softmax_scale, scheduler_metadata,
    ):  # fmt: skip
        """The reference's answer into ``target`` (contiguous), checking the metadata as FA3 would read it."""
        heads, head_dim = q.shape[-2:]

        def check_metadata(**schedule) -> None:
            """Raise unless ``scheduler_metadata`` is what FA3 makes for this forward's own schedule."""
            if scheduler_metadata is None:
                return
            calls.fwd_with_metadata += 1
            expected = _metadata(
                **schedule, num_heads=heads, num_kv_heads=k.shape[-2], head_dim=head_dim, head_dim_v=v.shape[-1],
                dtype=q.dtype, causal=params.causal, window_size=params.window_size, softcap=params.softcap,
                num_splits=params.num_splits, pack_gqa=params.pack_gqa,
            )  # fmt: skip
            if scheduler_metadata.shape != expected.shape or not torch.equal(scheduler_metadata, expected):
                raise AssertionError("scheduler metadata was made for another schedule (FA3 would misread it)")

        if leftpad_k is not None:  # batch mode: FA3 reads q.shape[1] queries per row over k.shape[1] keys
            if page_table is not None or cu_seqlens_q is not None or cu_seqlens_k is not None:
                raise NotImplementedError("leftpad_k: the stand-in computes batch mode without page table or cu_seqlens")
            batch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
            ends = torch.full_like(leftpad_k, seqlen_k) if seqused_k is None else seqused_k
            check_metadata(
                batch_size=batch, max_seqlen_q=seqlen_q, max_seqlen_k=seqlen_k, cache_seqlens=ends, cu_seqlens_q=None,
                page_size=None, leftpad_k=leftpad_k,
            )  # fmt: skip
            plan = reference.make_attention_plan(
                cache_seqlens=ends, key_starts=leftpad_k, max_seqlen_q=seqlen_q, max_seqlen_k=seqlen_k,
                num_heads=heads, num_kv_heads=k.shape[2], head_dim=head_dim, head_dim_v=v.shape[-1], dtype=q.dtype,
                layer_params=(params,),
            )  # fmt: skip
            reference.bind_attention(plan, params=params, softmax_scale=softmax_scale)(q, k, v, target)
            return
        if page_table is None:
            check_metadata(  # a packed plan's: made from each sequence's key count
                batch_size=cu_seqlens_q.shape[0] - 1, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                cache_seqlens=cu_seqlens_k[1:] - cu_seqlens_k[:-1], cu_seqlens_q=cu_seqlens_q, page_size=None,
            )  # fmt: skip
            reference.varlen_attention_out(
                q, k, v, target, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                max_seqlen_k=max_seqlen_k, params=params, softmax_scale=softmax_scale,
            )  # fmt: skip
            return
        page_size = k.shape[1]
        check_metadata(
            batch_size=page_table.shape[0], max_seqlen_q=max_seqlen_q,
            max_seqlen_k=page_table.shape[1] * page_size if paged_seqlen_k_from_page_table else max_seqlen_k,
            cache_seqlens=seqused_k, cu_seqlens_q=cu_seqlens_q, page_size=page_size,
        )  # fmt: skip
        plan = reference.make_attention_plan(
            cache_seqlens=seqused_k, page_table=page_table, cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k, page_size=page_size, num_heads=heads, num_kv_heads=k.shape[2],
            head_dim=head_dim, head_dim_v=v.shape[-1], dtype=q.dtype, layer_params=(params,),
        )  # fmt: skip
        reference.paged_attention_out(q, k, v, target, plan=plan, params=params, softmax_scale=softmax_scale)

    provider = FlashProvider(
        name, 3, fwd, scheduler_metadata if metadata else None, writes_out=writes_out, has_seqused_q=False,
        paged_seqlen_k_from_page_table=paged_seqlen_k_from_page_table, version=version,
        varlen_takes_metadata=varlen_takes_metadata,
    )  # fmt: skip
    return provider, calls
