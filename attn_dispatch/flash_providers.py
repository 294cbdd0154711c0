"""FlashAttention providers behind one small interface, shared by every plugin that runs FA3/FA4.

The same FA3 kernels ship in several packages whose Python entry points differ in names and argument
order (``page_table`` vs ``block_table``, ``num_heads`` vs ``num_heads_q``, vllm's ``max_seqlen_q``
before ``cu_seqlens_q``). Each adapter maps one package onto :class:`FlashProvider`; plugins call only
the adapter. :func:`probe` tries them in order, importing nothing until it is called (at plugin load).

Adapters, in FA3 probe order (:data:`FA3_ORDER`): ``sgl_kernel`` (sglang-kernel >= 0.4.10), ``vllm_fa3``
(the vllm wheel's FA3), ``flash_attn_interface`` (upstream FA3; cannot write into ``out``). ``fa4``
(flash-attn-4's CuTe forward, ``out=``, no scheduler metadata) is probed only when asked for, on sm100
(:func:`probe_order`). The Python wrappers are called with keyword arguments, so argument order
differences between packages never matter; the keywords each one needs are checked once, at probe time.

Only the tensors a call needs are passed; everything else is keyword-only and has FA3's default.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger("attn_dispatch")


@dataclass(frozen=True)
class FlashProvider:
    """One installed FlashAttention package, adapted.

    ``fwd(q, k, v, *, out, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, max_seqlen_q, max_seqlen_k,
    page_table, softmax_scale, causal, window_size, softcap, scheduler_metadata, num_splits, pack_gqa)``
    runs varlen attention and returns the output tensor. Paged KV: ``k``/``v`` are the caches
    ``[pages, page_size, kv_heads, d]`` with ``page_table`` and ``seqused_k`` (no ``cu_seqlens_k``).
    When ``writes_out`` is False the provider cannot write into a given ``out``: callers pass ``out=None``
    and copy the result once. ``out`` is ``[total_q, heads, head_dim_v]``, contiguous in its last dim.
    ``has_seqused_q``: ``fwd`` takes ``seqused_q`` (sgl_kernel and upstream FA3: on the non-paged path only).
    A sequence with no keys (``seqlen_k == 0``) gets zeros, as FA3 writes them (varlen_diffusion relies on
    it for fully masked rows; FA4's behaviour there is unverified).

    ``scheduler_metadata(...)`` (None when unsupported) returns FA3's int32 metadata tensor for a batch;
    keyword arguments: batch_size, max_seqlen_q, max_seqlen_k, num_heads, num_kv_heads, head_dim,
    head_dim_v, cache_seqlens, cu_seqlens_q, page_size, dtype, causal, window_size, softcap, num_splits,
    pack_gqa. It launches FA3's ``prepare_varlen_num_blocks`` once. A forward given that tensor must be
    scheduled identically: same batch, causal/window, softcap on/off, num_splits, pack_gqa, and the same
    key length. ``paged_seqlen_k_from_page_table`` says which key length a paged forward schedules for:
    False, the ``max_seqlen_k`` it is given (vllm's raw op); True, ``page_table.shape[1] * page_size``,
    because the package's paged entry point takes no ``max_seqlen_k`` (sgl_kernel, upstream FA3). Make the
    metadata with that length.
    """

    name: str
    fa_version: int
    fwd: Callable[..., torch.Tensor]
    scheduler_metadata: Callable[..., torch.Tensor] | None
    writes_out: bool
    has_seqused_q: bool
    paged_seqlen_k_from_page_table: bool = False
    bind_fwd: Callable[..., Callable[..., torch.Tensor]] | None = None

    def bind(self, **static) -> Callable[..., torch.Tensor]:
        """``fwd`` with every argument but the tensors fixed now: ``bind(**static)(q, k, v, out)`` is
        ``fwd(q, k, v, out=out, **static)``. For a call repeated with the same batch (every layer of a step);
        an adapter with a cheaper way to repeat a call (``bind_fwd``) lays its arguments out once."""
        if self.bind_fwd is not None:
            return self.bind_fwd(**static)
        fwd = self.fwd
        return lambda q, k, v, out: fwd(q, k, v, out=out, **static)

    def describe(self) -> str:
        caps = ["out=" if self.writes_out else "copy into out"]
        if self.scheduler_metadata is not None:
            caps.append("scheduler metadata")
        if self.has_seqused_q:
            caps.append("seqused_q")
        return f"{self.name} (FA{self.fa_version}: {', '.join(caps)})"


def _vllm_fa3() -> FlashProvider:
    """vllm's bundled FA3. Calls the raw op, which (unlike the Python wrapper) takes seqused_q and pack_gqa,
    and costs less host time per call (the wrapper adds an allocation and three stride checks). ``bind_fwd``
    lays the op's 37 positional arguments out once per batch; a layer's call then passes only its tensors."""
    from vllm.vllm_flash_attn import get_scheduler_metadata as vllm_metadata  # noqa: F401  (proves FA3 is there)

    return raw_fa3_ops_provider("vllm_fa3", torch.ops._vllm_fa3_C)


def raw_fa3_ops_provider(name: str, ops) -> FlashProvider:
    """A provider over FA3's raw ops ``ops.fwd`` and ``ops.get_scheduler_metadata`` (vllm's schema: 37 and 23
    positional arguments). Separate from the import so the argument layout can be tested without a GPU."""
    fa3_fwd = ops.fwd
    fa3_metadata = ops.get_scheduler_metadata

    def bind_fwd(
        *, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None, seqused_k=None, max_seqlen_q, max_seqlen_k,
        page_table=None, softmax_scale, causal, window_size=(-1, -1), softcap=0.0, scheduler_metadata=None,
        num_splits=0, pack_gqa=None,
    ):  # fmt: skip
        left, right = window_size

        def call(q, k, v, out):
            return fa3_fwd(
                q, k, v, None, None, None, out,  # k_new, v_new, q_v
                cu_seqlens_q, cu_seqlens_k, None, seqused_q, seqused_k,  # cu_seqlens_k_new
                max_seqlen_q, max_seqlen_k, page_table,
                None, None, None, None, None, None, None, None,  # kv_batch_idx, leftpad_k, rotary x3, descales x3
                softmax_scale, causal, left, right, softcap,
                True, scheduler_metadata, num_splits, pack_gqa, 0,  # rotary_interleaved, ..., sm_margin
                None, 1, 0, None,  # s_aux, cp_world_size, cp_rank, cp_tot_seqused_k
            )[0]  # fmt: skip

        return call

    def fwd(q, k, v, *, out=None, **static):
        return bind_fwd(**static)(q, k, v, out)

    def scheduler_metadata(
        *, batch_size, max_seqlen_q, max_seqlen_k, num_heads, num_kv_heads, head_dim, head_dim_v,
        cache_seqlens, cu_seqlens_q, page_size, dtype, causal, window_size, softcap, num_splits, pack_gqa,
    ):  # fmt: skip
        return fa3_metadata(
            batch_size, max_seqlen_q, max_seqlen_k, num_heads, num_kv_heads, head_dim, head_dim_v, dtype,
            cache_seqlens, cu_seqlens_q, None, None, None, None,  # cu_seqlens_k, _k_new, seqused_q, leftpad
            page_size, 0, causal, window_size[0], window_size[1], softcap > 0, num_splits, pack_gqa, 0,
        )  # fmt: skip

    return FlashProvider(name, 3, fwd, scheduler_metadata, writes_out=True, has_seqused_q=True, bind_fwd=bind_fwd)


def _sgl_kernel() -> FlashProvider:
    """sglang's kernel package. Only sglang-kernel >= 0.4.10 has both ``out=`` and ``get_scheduler_metadata``;
    older builds (sgl-kernel 0.3.x) import fine but are refused here, so the probe moves on to vllm."""
    from sgl_kernel import flash_attn as sgl_flash_attn

    with_kvcache = sgl_flash_attn.flash_attn_with_kvcache
    varlen = sgl_flash_attn.flash_attn_varlen_func
    metadata = getattr(sgl_flash_attn, "get_scheduler_metadata", None)
    _require_keywords("sgl_kernel.flash_attn.flash_attn_with_kvcache", with_kvcache, ("out", "scheduler_metadata", "pack_gqa"))
    _require_keywords("sgl_kernel.flash_attn.flash_attn_varlen_func", varlen, ("out", "seqused_q", "pack_gqa"))
    if metadata is None:
        raise ImportError("sgl_kernel.flash_attn has no get_scheduler_metadata (sglang-kernel >= 0.4.10 needed)")
    # Newer wrappers pick FA3 or FA4 with `ver`; pin FA3, whose scheduler metadata this adapter makes.
    fa3 = {"ver": 3} if "ver" in _keywords(with_kvcache) else {}
    varlen_takes_metadata = "scheduler_metadata" in _keywords(varlen)

    def fwd(
        q, k, v, *, out=None, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None, seqused_k=None,
        max_seqlen_q, max_seqlen_k, page_table=None, softmax_scale, causal, window_size=(-1, -1),
        softcap=0.0, scheduler_metadata=None, num_splits=0, pack_gqa=None,
    ):  # fmt: skip
        common = dict(
            softmax_scale=softmax_scale, causal=causal, window_size=tuple(window_size), softcap=softcap,
            num_splits=num_splits, pack_gqa=pack_gqa, out=out,
        )  # fmt: skip
        if page_table is not None:
            if seqused_q is not None or cu_seqlens_k is not None:
                raise NotImplementedError("sgl_kernel paged attention takes neither seqused_q nor cu_seqlens_k")
            return with_kvcache(
                q, k, v, cache_seqlens=seqused_k, page_table=page_table, cu_seqlens_q=cu_seqlens_q,
                max_seqlen_q=max_seqlen_q, scheduler_metadata=scheduler_metadata, **common, **fa3,
            )  # fmt: skip
        if scheduler_metadata is not None:
            if not varlen_takes_metadata:
                raise NotImplementedError("this sgl_kernel's flash_attn_varlen_func takes no scheduler_metadata")
            common["scheduler_metadata"] = scheduler_metadata
        return varlen(
            q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k, seqused_q=seqused_q, seqused_k=seqused_k, **common, **fa3,
        )  # fmt: skip

    return FlashProvider(
        "sgl_kernel", 3, fwd, _fa3_style_metadata(metadata), writes_out=True, has_seqused_q=True,
        paged_seqlen_k_from_page_table=True,  # flash_attn_with_kvcache passes no max_seqlen_k
    )  # fmt: skip


def _upstream_fa3() -> FlashProvider:
    """Upstream FA3 built from ``hopper/`` (module ``flash_attn_interface``). Its Python custom op rejects a
    passed ``out``, so this provider returns a fresh tensor and the caller copies it into its buffer once."""
    import flash_attn_interface as upstream

    with_kvcache = upstream.flash_attn_with_kvcache
    varlen = upstream.flash_attn_varlen_func
    _require_keywords("flash_attn_interface.flash_attn_with_kvcache", with_kvcache, ("scheduler_metadata", "pack_gqa"))
    _require_keywords("flash_attn_interface.flash_attn_varlen_func", varlen, ("seqused_q", "pack_gqa"))
    if not hasattr(upstream, "get_scheduler_metadata"):
        raise ImportError("flash_attn_interface has no get_scheduler_metadata (FA3 too old)")

    def fwd(
        q, k, v, *, out=None, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None, seqused_k=None,
        max_seqlen_q, max_seqlen_k, page_table=None, softmax_scale, causal, window_size=(-1, -1),
        softcap=0.0, scheduler_metadata=None, num_splits=0, pack_gqa=None,
    ):  # fmt: skip
        if out is not None:
            raise TypeError("flash_attn_interface cannot write into `out` (writes_out=False): pass out=None and copy")
        common = dict(
            softmax_scale=softmax_scale, causal=causal, window_size=tuple(window_size), softcap=softcap,
            num_splits=num_splits, pack_gqa=pack_gqa,
        )  # fmt: skip
        if page_table is not None:
            if seqused_q is not None or cu_seqlens_k is not None:
                raise NotImplementedError("flash_attn_with_kvcache takes neither seqused_q nor cu_seqlens_k")
            return with_kvcache(
                q, k, v, cache_seqlens=seqused_k, page_table=page_table, cu_seqlens_q=cu_seqlens_q,
                max_seqlen_q=max_seqlen_q, scheduler_metadata=scheduler_metadata, **common,
            )  # fmt: skip
        if scheduler_metadata is not None:
            raise NotImplementedError("flash_attn_interface.flash_attn_varlen_func takes no scheduler_metadata")
        return varlen(
            q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k, seqused_q=seqused_q, seqused_k=seqused_k, **common,
        )  # fmt: skip

    metadata = _fa3_style_metadata(upstream.get_scheduler_metadata)
    return FlashProvider(
        "flash_attn_interface", 3, fwd, metadata, writes_out=False, has_seqused_q=True,
        paged_seqlen_k_from_page_table=True,  # flash_attn_with_kvcache passes no max_seqlen_k
    )  # fmt: skip


def _fa4() -> FlashProvider:
    """flash-attn-4 (CuTe DSL) for sm100. Its private ``_flash_attn_fwd`` takes ``out=`` (the public varlen
    function does not). FA4 schedules inside the kernel: there is no FA3-style metadata tensor to precompute."""
    from flash_attn.cute.interface import _flash_attn_fwd

    _require_keywords("flash_attn.cute.interface._flash_attn_fwd", _flash_attn_fwd, ("out", "page_table", "seqused_q"))

    def fwd(
        q, k, v, *, out=None, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None, seqused_k=None,
        max_seqlen_q, max_seqlen_k, page_table=None, softmax_scale, causal, window_size=(-1, -1),
        softcap=0.0, scheduler_metadata=None, num_splits=0, pack_gqa=None,
    ):  # fmt: skip
        if scheduler_metadata is not None:
            raise NotImplementedError("FA4 takes no FA3 scheduler metadata")
        left, right = window_size
        result, _lse = _flash_attn_fwd(
            q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, seqused_q=seqused_q,
            seqused_k=seqused_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, page_table=page_table,
            softmax_scale=softmax_scale, causal=causal, softcap=softcap if softcap > 0 else None,
            window_size_left=left if left >= 0 else None, window_size_right=right if right >= 0 else None,
            num_splits=num_splits, pack_gqa=pack_gqa, out=out,
        )  # fmt: skip
        return result

    return FlashProvider("fa4", 4, fwd, None, writes_out=True, has_seqused_q=True)


def _fa3_style_metadata(get_scheduler_metadata: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Adapt a ``get_scheduler_metadata`` Python wrapper (sgl_kernel's or upstream's). Both take the first seven
    arguments in the same order (their names differ: num_heads vs num_heads_q) and the rest by these keywords."""

    def scheduler_metadata(
        *, batch_size, max_seqlen_q, max_seqlen_k, num_heads, num_kv_heads, head_dim, head_dim_v,
        cache_seqlens, cu_seqlens_q, page_size, dtype, causal, window_size, softcap, num_splits, pack_gqa,
    ):  # fmt: skip
        return get_scheduler_metadata(
            batch_size, max_seqlen_q, max_seqlen_k, num_heads, num_kv_heads, head_dim, cache_seqlens,
            qkv_dtype=dtype, headdim_v=head_dim_v, cu_seqlens_q=cu_seqlens_q, page_size=page_size,
            causal=causal, window_size=tuple(window_size), has_softcap=softcap > 0, num_splits=num_splits,
            pack_gqa=pack_gqa,
        )  # fmt: skip

    return scheduler_metadata


def _keywords(fn: Callable) -> set[str]:
    return set(inspect.signature(fn).parameters)


def _require_keywords(name: str, fn: Callable, keywords: tuple[str, ...]) -> None:
    missing = [keyword for keyword in keywords if keyword not in _keywords(fn)]
    if missing:
        raise ImportError(f"{name} lacks {', '.join(missing)} (installed version too old)")


# FA3 probe order: sglang's kernel package, then vllm's, then upstream FA3 (which cannot write into `out`).
FA3_ORDER: tuple[str, ...] = ("sgl_kernel", "vllm_fa3", "flash_attn_interface")
# Blackwell: FA3's kernels are Hopper-only; flash-attn-4 is the provider there.
FA4_ORDER: tuple[str, ...] = ("fa4",)

PROVIDERS: dict[str, Callable[[], FlashProvider]] = {
    "sgl_kernel": _sgl_kernel,
    "vllm_fa3": _vllm_fa3,
    "flash_attn_interface": _upstream_fa3,
    "fa4": _fa4,
}


def probe_order(arch: str) -> tuple[str, ...]:
    """The providers worth trying on ``arch`` (a :attr:`Hardware.arch` value such as ``"sm90"``)."""
    return FA4_ORDER if arch == "sm100" else FA3_ORDER


def require(arch: str, order: tuple[str, ...] | None = None) -> FlashProvider:
    """The first importable provider for ``arch`` (``order`` defaults to :func:`probe_order`), or
    :class:`~attn_dispatch.MissingDependency` with what each candidate said: a plugin's decline."""
    from .hookspecs import MissingDependency

    provider, reason = probe(order or probe_order(arch))
    if provider is not None:
        return provider
    if arch == "sm100" and not order:
        raise MissingDependency(f"flash-attn-4 not installed (FA3's kernels are Hopper-only): {reason}")
    raise MissingDependency(f"install sglang-kernel>=0.4.10 or vllm: {reason}")


def probe(order: tuple[str, ...] | None = None) -> tuple[FlashProvider | None, str]:
    """The first provider that imports, and a reason listing what failed when none does.

    ``order`` defaults to :data:`FA3_ORDER`; an unknown name is reported as a failure, not raised.
    """
    failures = []
    for name in order or FA3_ORDER:
        factory = PROVIDERS.get(name)
        if factory is None:
            failures.append(f"{name}: unknown provider (known: {', '.join(PROVIDERS)})")
            continue
        try:
            provider = factory()
        except Exception as exc:  # ImportError, or a package present without its FA extension
            failures.append(f"{name}: {type(exc).__name__}: {exc}".splitlines()[0])
            continue
        log.debug("FlashAttention provider: %s", provider.describe())
        return provider, ""
    return None, "no FlashAttention provider importable (" + "; ".join(failures) + ")"
