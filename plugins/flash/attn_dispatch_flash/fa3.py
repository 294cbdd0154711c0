"""FA3 adapters: vllm's raw ops, sglang's ``sgl_kernel`` and upstream ``flash_attn_interface``.

The same FA3 kernels ship in several packages whose entry points differ in names and argument order
(``page_table`` vs ``block_table``, ``num_heads`` vs ``num_heads_q``, vllm's ``max_seqlen_q`` before
``cu_seqlens_q``). Each adapter here maps one package onto :class:`FlashProvider` by binding a
:class:`FlashArgs` once. The Python wrappers are called with keywords, so argument order never matters
there; the keywords each one needs are checked once, when the adapter is made (at probe time). Each
factory imports its package and raises when it is missing or too old.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from importlib import metadata

import torch

from .args import FlashArgs
from .provider import BoundCall, FlashProvider


def vllm_fa3() -> FlashProvider:
    """vllm's bundled FA3. Calls the raw op, which (unlike the Python wrapper) takes seqused_q and pack_gqa,
    and costs less host time per call (the wrapper adds an allocation and three stride checks)."""
    from vllm.vllm_flash_attn import get_scheduler_metadata as vllm_metadata  # noqa: F401  (proves FA3 is there)

    return raw_fa3_ops_provider("vllm_fa3", torch.ops._vllm_fa3_C, version=distribution_version("vllm"))


def distribution_version(*names: str) -> str:
    """The version of the first installed distribution among ``names``, or "" (a build run from a source
    tree has no distribution metadata)."""
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return ""


def raw_fa3_ops_provider(name: str, ops, version: str = "") -> FlashProvider:
    """A provider over FA3's raw ops ``ops.fwd`` and ``ops.get_scheduler_metadata`` (vllm's schema: 37 and 23
    positional arguments). Binding lays the 37 arguments out once; a layer's call then passes only its
    tensors. Separate from the import so the argument layout can be tested without a GPU."""
    # The overloads themselves: calling a packet resolves the overload on every call.
    fa3_fwd = getattr(ops.fwd, "default", ops.fwd)
    fa3_metadata = getattr(ops.get_scheduler_metadata, "default", ops.get_scheduler_metadata)

    def bind_args(a: FlashArgs) -> BoundCall:
        left, right = a.window_size
        # Everything after `out`, laid out now: a layer's call adds only its four tensors (reading 30
        # fields per call cost several us of host time in a host-bound decode step).
        rest = (
            a.cu_seqlens_q, a.cu_seqlens_k, None, a.seqused_q, a.seqused_k,  # cu_seqlens_k_new
            a.max_seqlen_q, a.max_seqlen_k, a.page_table,
            None, a.leftpad_k, None, None, None, None, None, None,  # kv_batch_idx, leftpad_k, rotary x3, descales x3
            a.softmax_scale, a.causal, left, right, a.softcap,
            True, a.scheduler_metadata, a.num_splits, a.pack_gqa, 0,  # rotary_interleaved, ..., sm_margin
            None, 1, 0, None,  # s_aux, cp_world_size, cp_rank, cp_tot_seqused_k
        )  # fmt: skip

        def call(q, k, v, out):
            return fa3_fwd(q, k, v, None, None, None, out, *rest)[0]  # k_new, v_new, q_v

        return call

    def scheduler_metadata(
        *, batch_size, max_seqlen_q, max_seqlen_k, num_heads, num_kv_heads, head_dim, head_dim_v,
        cache_seqlens, cu_seqlens_q, page_size, dtype, causal, window_size, softcap, num_splits, pack_gqa,
        leftpad_k=None,
    ):  # fmt: skip
        return fa3_metadata(
            batch_size, max_seqlen_q, max_seqlen_k, num_heads, num_kv_heads, head_dim, head_dim_v, dtype,
            cache_seqlens, cu_seqlens_q, None, None, None, leftpad_k,  # cu_seqlens_k, _k_new, seqused_q, leftpad
            page_size, 0, causal, window_size[0], window_size[1], softcap > 0, num_splits, pack_gqa, 0,
        )  # fmt: skip

    return FlashProvider.from_binder(
        name, 3, bind_args, scheduler_metadata, writes_out=True, has_seqused_q=True, version=version
    )  # fmt: skip


def sgl_kernel() -> FlashProvider:
    """sglang's kernel package. Only sglang-kernel >= 0.4.10 has both ``out=`` and ``get_scheduler_metadata``;
    older builds (sgl-kernel 0.3.x) import fine but are refused here, so the probe moves on to vllm."""
    from sgl_kernel import flash_attn as sgl_flash_attn

    with_kvcache = sgl_flash_attn.flash_attn_with_kvcache
    varlen = sgl_flash_attn.flash_attn_varlen_func
    metadata = getattr(sgl_flash_attn, "get_scheduler_metadata", None)
    require_keywords("sgl_kernel.flash_attn.flash_attn_with_kvcache", with_kvcache, ("out", "scheduler_metadata", "pack_gqa", "cache_leftpad"))
    require_keywords("sgl_kernel.flash_attn.flash_attn_varlen_func", varlen, ("out", "seqused_q", "pack_gqa"))
    if metadata is None:
        raise ImportError("sgl_kernel.flash_attn has no get_scheduler_metadata (sglang-kernel >= 0.4.10 needed)")
    # Newer wrappers pick FA3 or FA4 with `ver`; pin FA3, whose scheduler metadata this adapter makes.
    fa3 = {"ver": 3} if "ver" in keywords_of(with_kvcache) else {}
    varlen_takes_metadata = "scheduler_metadata" in keywords_of(varlen)
    bind_args = _wrapper_binder("sgl_kernel", with_kvcache, varlen, varlen_takes_metadata, extra=fa3, takes_out=True)
    return FlashProvider.from_binder(
        "sgl_kernel", 3, bind_args, fa3_style_metadata(metadata), writes_out=True, has_seqused_q=True,
        paged_seqlen_k_from_page_table=True,  # flash_attn_with_kvcache passes no max_seqlen_k
        varlen_takes_metadata=varlen_takes_metadata, version=distribution_version("sglang-kernel", "sgl-kernel"),
    )  # fmt: skip


def upstream_fa3() -> FlashProvider:
    """Upstream FA3 built from ``hopper/`` (module ``flash_attn_interface``). Its Python custom op rejects a
    passed ``out``, so this provider returns a fresh tensor and the caller copies it into its buffer once."""
    import flash_attn_interface as upstream

    with_kvcache = upstream.flash_attn_with_kvcache
    varlen = upstream.flash_attn_varlen_func
    require_keywords("flash_attn_interface.flash_attn_with_kvcache", with_kvcache, ("scheduler_metadata", "pack_gqa", "cache_leftpad"))
    require_keywords("flash_attn_interface.flash_attn_varlen_func", varlen, ("seqused_q", "pack_gqa"))
    if not hasattr(upstream, "get_scheduler_metadata"):
        raise ImportError("flash_attn_interface has no get_scheduler_metadata (FA3 too old)")
    bind_args = _wrapper_binder("flash_attn_interface", with_kvcache, varlen, False, extra={}, takes_out=False)
    return FlashProvider.from_binder(
        "flash_attn_interface", 3, bind_args, fa3_style_metadata(upstream.get_scheduler_metadata),
        writes_out=False, has_seqused_q=True, varlen_takes_metadata=False,
        paged_seqlen_k_from_page_table=True,  # flash_attn_with_kvcache passes no max_seqlen_k
        version=distribution_version("flash_attn_3", "flash-attn-3"),
    )  # fmt: skip


def _wrapper_binder(
    name: str, with_kvcache: Callable, varlen: Callable, varlen_takes_metadata: bool, *, extra: dict, takes_out: bool
) -> Callable[[FlashArgs], BoundCall]:
    """Bind FlashArgs onto FA3's two Python wrappers (sgl_kernel's and upstream's share their keywords):
    ``flash_attn_with_kvcache`` when there is a page table or ``leftpad_k`` (its ``cache_leftpad``: batch
    mode over left-padded rows), ``flash_attn_varlen_func`` otherwise."""

    def bind_args(a: FlashArgs) -> BoundCall:
        kw = dict(
            softmax_scale=a.softmax_scale, causal=a.causal, window_size=tuple(a.window_size), softcap=a.softcap,
            num_splits=a.num_splits, pack_gqa=a.pack_gqa, **extra,
        )  # fmt: skip
        if a.leftpad_k is not None:  # batch mode: [B, S, H, D] q and caches, each row's keys [leftpad_k, seqused_k)
            if a.page_table is not None or a.cu_seqlens_q is not None or a.cu_seqlens_k is not None:
                raise NotImplementedError(f"{name}: leftpad_k takes [B, S, H, D] tensors, no page table or cu_seqlens")
            kw.update(cache_seqlens=a.seqused_k, cache_leftpad=a.leftpad_k, scheduler_metadata=a.scheduler_metadata)
            entry = with_kvcache
        elif a.page_table is not None:
            if a.seqused_q is not None or a.cu_seqlens_k is not None:
                raise NotImplementedError(f"{name} paged attention takes neither seqused_q nor cu_seqlens_k")
            kw.update(cache_seqlens=a.seqused_k, page_table=a.page_table, cu_seqlens_q=a.cu_seqlens_q,
                      max_seqlen_q=a.max_seqlen_q, scheduler_metadata=a.scheduler_metadata)  # fmt: skip
            entry = with_kvcache
        else:
            if a.scheduler_metadata is not None:
                if not varlen_takes_metadata:
                    raise NotImplementedError(f"{name}'s flash_attn_varlen_func takes no scheduler_metadata")
                kw["scheduler_metadata"] = a.scheduler_metadata
            kw.update(cu_seqlens_q=a.cu_seqlens_q, cu_seqlens_k=a.cu_seqlens_k, max_seqlen_q=a.max_seqlen_q,
                      max_seqlen_k=a.max_seqlen_k, seqused_q=a.seqused_q, seqused_k=a.seqused_k)  # fmt: skip
            entry = varlen

        if takes_out:
            return lambda q, k, v, out: entry(q, k, v, out=out, **kw)

        def call(q, k, v, out):
            if out is not None:
                raise TypeError(f"{name} cannot write into `out` (writes_out=False): pass out=None and copy")
            return entry(q, k, v, **kw)

        return call

    return bind_args


def fa3_style_metadata(get_scheduler_metadata: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Adapt a ``get_scheduler_metadata`` Python wrapper (sgl_kernel's or upstream's). Both take the first seven
    arguments in the same order (their names differ: num_heads vs num_heads_q) and the rest by these keywords."""

    def scheduler_metadata(
        *, batch_size, max_seqlen_q, max_seqlen_k, num_heads, num_kv_heads, head_dim, head_dim_v,
        cache_seqlens, cu_seqlens_q, page_size, dtype, causal, window_size, softcap, num_splits, pack_gqa,
        leftpad_k=None,
    ):  # fmt: skip
        # cache_leftpad only for a padded batch: a wrapper without that keyword still plans the other kinds
        leftpad = {} if leftpad_k is None else {"cache_leftpad": leftpad_k}
        return get_scheduler_metadata(
            batch_size, max_seqlen_q, max_seqlen_k, num_heads, num_kv_heads, head_dim, cache_seqlens,
            qkv_dtype=dtype, headdim_v=head_dim_v, cu_seqlens_q=cu_seqlens_q, page_size=page_size, causal=causal,
            window_size=tuple(window_size), has_softcap=softcap > 0, num_splits=num_splits, pack_gqa=pack_gqa,
            **leftpad,
        )  # fmt: skip

    return scheduler_metadata


def keywords_of(fn: Callable) -> set[str]:
    return set(inspect.signature(fn).parameters)


def require_keywords(name: str, fn: Callable, keywords: tuple[str, ...]) -> None:
    """ImportError (the probe's "not usable") when ``fn`` lacks any of ``keywords``."""
    missing = [keyword for keyword in keywords if keyword not in keywords_of(fn)]
    if missing:
        raise ImportError(f"{name} lacks {', '.join(missing)} (installed version too old)")
