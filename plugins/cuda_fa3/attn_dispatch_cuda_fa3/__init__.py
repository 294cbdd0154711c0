"""FlashAttention-3 on sm90 (FA4 on sm100): attention writes into the engine's preallocated output
(no device-to-device copy per layer) and the scheduler metadata is made once per batch, not per layer.
Seed PRs: sglang #21985 (out-aliasing) and #21104 (metadata precompute).

The plugin registers the whole "attention_out" group (``make_attention_plan``, ``paged_attention_out``,
``varlen_attention_out``) over the first FlashAttention provider that imports
(:mod:`attn_dispatch_flash`, a shared internal distribution: sgl_kernel, vllm, upstream FA3; FA4 on sm100).

Settings (declared in the spec, read and reported by the host, handed to ``attn_dispatch_register_ops``):

* ``ATTN_DISPATCH_CUDA_FA3_PROVIDER=vllm_fa3[,…]``: the providers to try, in order, instead of the arch's
  default order.
* ``ATTN_DISPATCH_CUDA_FA3_PATH=original``: register the pre-optimization path on the same kernels
  (alloc + copy into ``out``, metadata per layer) for A/B runs; ``optimized`` (the default) otherwise.

``stats`` counts the copies into ``out`` a provider without ``out=`` forces (see :mod:`.stats`).

Known-wrong guard (:mod:`.known_wrong`): a layer whose configuration the installed provider build is
known to answer wrongly is bound to a dense torch route instead, logged once per class and counted
(``stats.guarded_bindings``); under ``ATTN_DISPATCH_STRICT=1`` binding it raises
:class:`KnownWrongConfiguration`. ``attn-dispatch info`` names the classes that cover the provider.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from attn_dispatch import Hardware, PluginSpec, Setting, hookimpl
from attn_dispatch_flash import FlashProvider, require

from . import known_wrong
from .known_wrong import KnownWrongConfiguration
from .ops import AttentionOutOps, build_ops
from .plan import FlashPlan
from .stats import Stats, stats

log = logging.getLogger("attn_dispatch")

NAME = "cuda_fa3"
ARCHS = ("sm90", "sm100")
PATHS = ("optimized", "original")
SETTINGS = (
    Setting("provider", default=(), kind="list", help="providers to try, in order (default: the arch's order)"),
    Setting("path", default="optimized", choices=PATHS, help="original: the pre-optimization path (A/B runs)"),
)

__all__ = ["AttentionOutOps", "FlashPlan", "KnownWrongConfiguration", "Stats", "build_ops", "resolve_provider", "stats"]


@hookimpl
def attn_dispatch_plugin_spec(hardware: Hardware) -> PluginSpec:
    return PluginSpec(name=NAME, archs=ARCHS, requires=("torch",), description=__doc__.splitlines()[0], settings=SETTINGS)


@hookimpl
def attn_dispatch_register_ops(hardware: Hardware, register, settings: Mapping[str, object]) -> None:
    """Resolve the provider once, then offer the three ops of the "attention_out" group over it."""
    provider = resolve_provider(hardware.arch, settings["provider"])
    original = settings["path"] == "original"
    note = describe(provider, original)
    for op, implementation in build_ops(provider, original=original, strict=settings.get("strict", False)).items():
        register(op, implementation, note=note)


def resolve_provider(arch: str, order: tuple[str, ...] = ()) -> FlashProvider:
    """The provider for ``arch``, probing ``order`` (the ``provider`` setting) or else the arch's default
    order; :class:`attn_dispatch.MissingDependency` with what each candidate said."""
    return require(arch, tuple(order) or None)


def describe(provider: FlashProvider, original: bool) -> str:
    """The one line ``attn-dispatch info`` shows next to each op."""
    if original:
        return f"{provider.describe()}; original path: alloc + copy into out, scheduling per layer{guarded(provider)}"
    if provider.writes_out:
        writes = "writes into out (0 copies)"
    else:
        writes = "1 copy into out per call (counted: attn_dispatch_cuda_fa3.stats.out_copies)"
    schedule = "metadata once per batch" if provider.scheduler_metadata is not None else "kernel-side scheduling"
    return f"{provider.describe()}; {writes}; {schedule}{guarded(provider)}"


def guarded(provider: FlashProvider) -> str:
    """The known-wrong classes that cover ``provider`` (rerouted when a layer's call is bound), for the note."""
    return "".join(f"; {entry.describe(provider)}" for entry in known_wrong.classes_for(provider))
