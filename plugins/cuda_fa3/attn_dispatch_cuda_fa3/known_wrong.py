"""Configurations an installed FlashAttention build is known to answer wrongly, and the guard that keeps
them off it.

:data:`TABLE` lists, per provider and version range, a class of layers that the conformance suite
(``tests/test_conformance.py``; narrowed down by ``benchmarks/diag_fa3_guard.py`` and
``benchmarks/diag_fa3_sweep.py``) found wrong, with the evidence. When a layer's call is bound, never per
call (:func:`.binding.bind_layer_call`), :func:`guard` looks the layer up. A listed layer is:

* rerouted to :mod:`.dense` (plain torch: right, slower), logged once per class and counted in
  ``stats.guarded_bindings``; or
* refused with :class:`KnownWrongConfiguration` under ``ATTN_DISPATCH_STRICT=1``.

A provider version past a class's ``last_bad_version`` is not guarded (and so not slowed down); an unknown
version ("") is, since nothing shows it fixed. Providers the table does not name were not found wrong by
the suite (or were not available to run it).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

from attn_dispatch_flash import FlashArgs, FlashProvider

from .dense import bind_dense
from .stats import stats

log = logging.getLogger("attn_dispatch")


class KnownWrongConfiguration(RuntimeError):
    """Under ``ATTN_DISPATCH_STRICT=1``: a layer the installed FlashAttention is known to answer wrongly."""


@dataclass(frozen=True)
class Layer:
    """What the table looks at: the layer's shape and its call's scheduling arguments."""

    heads: int
    kv_heads: int
    head_dim: int
    causal: bool
    window_size: tuple[int, int]
    max_seqlen_q: int
    max_seqlen_k: int

    @classmethod
    def of(cls, args: FlashArgs, heads: int, kv_heads: int, head_dim: int) -> Layer:
        return cls(heads, kv_heads, head_dim, args.causal, tuple(args.window_size), args.max_seqlen_q, args.max_seqlen_k)


@dataclass(frozen=True)
class KnownWrong:
    """One class of wrong answers: ``applies(layer)`` on ``provider`` up to ``last_bad_version``."""

    provider: str
    last_bad_version: str
    summary: str
    evidence: str
    applies: Callable[[Layer], bool]

    def covers(self, provider: FlashProvider) -> bool:
        if provider.name != self.provider:
            return False
        return not provider.version or release(provider.version) <= release(self.last_bad_version)

    def describe(self, provider: FlashProvider) -> str:
        return f"known-wrong: {provider.name} {provider.version or '(version unknown)'}: {self.summary}"


def release(version: str) -> tuple[int, ...]:
    """``"0.33.0+cu130"`` -> ``(0, 33, 0)``: the leading numbers, enough to order release versions."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0].split("rc")[0].split("dev")[0])[:3])


def local_window_prefill(layer: Layer) -> bool:
    """A window that can hide keys from some query, with more than one query per sequence.

    A window no query can reach past (``left >= max_seqlen_k - 1``; ``right >= max_seqlen_q - 1``) is no
    window: FA3 itself drops it. Decode (one query per sequence) passed the whole vLLM decode grid, windows
    included, so it is left on the kernel.
    """
    if layer.max_seqlen_q <= 1:
        return False
    left, right = layer.window_size
    right_bites = not layer.causal and 0 <= right < layer.max_seqlen_q - 1
    return right_bites or 0 <= left < layer.max_seqlen_k - 1


TABLE: tuple[KnownWrong, ...] = (
    KnownWrong(
        provider="vllm_fa3",
        last_bad_version="0.33.0",
        summary="local (sliding) window attention with more than one query per sequence answers some "
        "windows wrongly; rerouted to the dense torch route",
        evidence="one sequence of 651 queries over 651 keys, 32/8 heads, d 256, causal window (w, 0): max error "
        "0.49, 0.48, 0.26, 0.21 for w = 100, 176, 300, 500 against 0.009 (yardstick 0.031) for w = 150, 200, 255, "
        "400, 640; vllm's own flash_attn_varlen_func gives the same bytes; fp32 SDPA with the same mask matches "
        "the reference exactly. Seen for head dims 128 to 256, MHA and GQA, causal and two-sided windows, fp16 "
        "and bf16, paged and packed, every num_splits and pack_gqa, one or many sequences.",
        applies=local_window_prefill,
    ),
)

_warned: set[tuple[str, str, str]] = set()


def classes_for(provider: FlashProvider) -> list[KnownWrong]:
    """The table's classes that cover ``provider`` (what ``attn-dispatch info`` lists)."""
    return [entry for entry in TABLE if entry.covers(provider)]


def find(provider: FlashProvider, layer: Layer) -> KnownWrong | None:
    return next((entry for entry in TABLE if entry.covers(provider) and entry.applies(layer)), None)


def guard(provider: FlashProvider, args: FlashArgs, layer: Layer, *, strict: bool):
    """None for a layer the table does not list; else the dense route's call for ``args`` (logged once per
    class, counted), or :class:`KnownWrongConfiguration` under strict mode."""
    entry = find(provider, layer)
    if entry is None:
        return None
    message = entry.describe(provider)
    if strict:
        raise KnownWrongConfiguration(f"ATTN_DISPATCH_STRICT=1: {message} (this layer: {layer})")
    stats.guarded_bindings += 1
    key = (provider.name, provider.version, entry.summary)
    if key not in _warned:
        _warned.add(key)
        log.warning("cuda_fa3: %s (first such layer: %s)", message, layer)
    return bind_dense(args)
