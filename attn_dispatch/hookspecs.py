"""The hooks a plugin implements. Both are called once per :func:`attn_dispatch.load`, never per layer.

A plugin is a module (found through the ``attn_dispatch`` entry-point group) with::

    from attn_dispatch import hookimpl, PluginSpec, MissingDependency

    @hookimpl
    def attn_dispatch_plugin_spec(hardware):
        return PluginSpec(name="cuda_fa3", archs=("sm90",), requires=("torch",))

    @hookimpl
    def attn_dispatch_register_ops(hardware, register):
        provider = probe_fa3()                     # import-heavy work belongs here, not at module import
        if provider is None:
            raise MissingDependency("no FA3 provider: install sglang-kernel or vllm")
        register("varlen_attention_out", make_varlen(provider), note=provider.name)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pluggy

from .hardware import Hardware

PROJECT = "attn_dispatch"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[..., None]
"""``register(op_name, implementation, *, note="")``: offer ``implementation`` for the named operation.
``note`` is one line for ``attn-dispatch info`` (for example the kernel provider in use)."""


@dataclass(frozen=True)
class PluginSpec:
    """What a plugin says about itself before it is asked for anything.

    ``name`` is the entry-point name, lower case; it also names its switch ``ATTN_DISPATCH_<NAME>``.
    ``archs`` lists the :attr:`Hardware.arch` values it targets; on any other arch it is never asked to
    register. ``requires`` lists modules that must be importable (checked with ``find_spec``, no import).
    """

    name: str
    archs: tuple[str, ...]
    requires: tuple[str, ...] = ()
    description: str = ""


class PluginUnavailable(Exception):
    """Raised from :func:`attn_dispatch_register_ops` to decline, with a one-line reason."""

    status = "failed"


class MissingDependency(PluginUnavailable):
    """The plugin targets this arch but a library it needs is absent ("aiter not installed")."""

    status = "missing-dependency"


class NotThisArch(PluginUnavailable):
    """The arch matched but the device still is not a target (for example: no FA3 on this sm100 setup)."""

    status = "not-this-arch"


@hookspec
def attn_dispatch_plugin_spec(hardware: Hardware) -> PluginSpec:
    """Describe the plugin.

    Called: once per load, for every discovered plugin, enabled or not, before any registration.
    Gets: the detected :class:`Hardware`.
    Returns: a :class:`PluginSpec`. Must not import heavy or optional libraries.
    """


@hookspec
def attn_dispatch_register_ops(hardware: Hardware, register: Register) -> None:
    """Offer implementations of named operations (see :data:`attn_dispatch.ops.OP_GROUPS`).

    Called: once per load, only for plugins that are enabled, target ``hardware.arch`` and whose
    ``requires`` are importable.
    Gets: the detected :class:`Hardware` and the ``register`` callback.
    Returns: nothing. To decline, raise :class:`MissingDependency` or :class:`NotThisArch` with a
    one-line reason; nothing it registered is kept. Any other exception marks the plugin ``failed``.
    A plugin registers every operation of a group or none of it: a plan made by one plugin is never
    consumed by another's kernel.
    """
