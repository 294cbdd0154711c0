"""The named operations, their groups, and the resolved :class:`Ops` an engine calls per layer.

An :class:`Ops` is built once by :func:`attn_dispatch.load`. Its op attributes are the chosen functions
themselves, so ``ops.paged_attention_out(...)`` costs one attribute lookup and a direct call: no pluggy,
no dict of candidates, no checks of which plugin is active.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import reference
from .hardware import Hardware

if TYPE_CHECKING:
    from .plugins import PluginReport
    from .settings import SettingValue

# A plugin provides a whole group or none of it: the plan/meta made by one op is consumed by the others.
OP_GROUPS: Mapping[str, tuple[str, ...]] = {
    # 1 + 2: attention written into the engine's buffer, and the per-batch plan (FA3 scheduler metadata);
    # bind_attention hands the engine a plan's per-layer call (FlashInfer's plan()/run()).
    "attention_out": ("make_attention_plan", "paged_attention_out", "varlen_attention_out", "bind_attention"),
    # 3: MLA value up-projection into o_proj's input layout.
    "mla_v_up_proj": ("mla_v_up_proj",),
    # 4: MLA/NSA decode query hand-off, model side and backend side.
    "mla_decode_query": ("mla_query_for_backend", "mla_decode_query"),
    # 5: key-padding-masked attention for diffusion, with per-request mask metadata.
    "masked_attention": ("build_mask_meta", "masked_attention"),
}
OP_NAMES: tuple[str, ...] = tuple(name for group in OP_GROUPS.values() for name in group)
GROUP_OF: Mapping[str, str] = {name: group for group, names in OP_GROUPS.items() for name in names}
REFERENCE: Mapping[str, Callable] = {name: getattr(reference, name) for name in OP_NAMES}


@dataclass(frozen=True)
class Resolution:
    """Which implementation an operation resolved to, and why (for ``attn-dispatch info``)."""

    op: str
    plugin: str  # "reference" when no plugin provides it
    function: str  # module.qualname
    note: str = ""


@dataclass(frozen=True, eq=False)
class Ops:
    """Resolved operations for one device. Each op's contract: ``attn_dispatch.opspecs.SPECS[op]`` (its
    signature, its argument rules in ``attn_dispatch.validate``) and its meaning, ``attn_dispatch.reference``."""

    make_attention_plan: Callable
    paged_attention_out: Callable
    varlen_attention_out: Callable
    bind_attention: Callable
    mla_v_up_proj: Callable
    mla_query_for_backend: Callable
    mla_decode_query: Callable
    build_mask_meta: Callable
    masked_attention: Callable

    hardware: Hardware
    resolutions: Mapping[str, Resolution] = field(default_factory=dict)
    plugins: tuple[PluginReport, ...] = ()
    settings: tuple[SettingValue, ...] = ()  # the host's settings as this load read them

    def summary(self) -> str:
        """One line: the hardware, the active plugins and how many ops each took."""
        taken: dict[str, int] = {}
        for res in self.resolutions.values():
            taken[res.plugin] = taken.get(res.plugin, 0) + 1
        ops = ", ".join(f"{plugin}={count}" for plugin, count in sorted(taken.items()))
        plugins = ", ".join(f"{p.name}:{p.status}" for p in self.plugins) or "none found"
        return f"attn_dispatch on {self.hardware}: ops {ops}; plugins {plugins}"


def function_name(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def reference_resolutions() -> dict[str, Resolution]:
    return {name: Resolution(name, "reference", function_name(fn)) for name, fn in REFERENCE.items()}
