"""The hooks a plugin implements. Both are called once per :func:`attn_dispatch.load`, never per layer.

A plugin is a module (found through the ``attn_dispatch`` entry-point group, under a lower-case name)::

    from attn_dispatch import MissingDependency, PluginSpec, Setting, hookimpl

    @hookimpl
    def attn_dispatch_plugin_spec(hardware):
        order = Setting("provider", default=(), kind="list", help="providers to try, in order")
        return PluginSpec(name="cuda_fa3", archs=("sm90",), requires=("torch",), settings=(order,))

    @hookimpl
    def attn_dispatch_register_ops(hardware, register, settings):  # any argument may be left out
        provider = probe_fa3(settings["provider"])  # import-heavy work belongs here, not at module import
        if provider is None:
            raise MissingDependency("no FA3 provider: install sglang-kernel or vllm")
        register("varlen_attention_out", make_varlen(provider), note=provider.name)"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import pluggy

from .hardware import Hardware
from .settings import Setting

PROJECT = "attn_dispatch"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[..., None]
"""``register(op_name, implementation, *, note="")``: offer ``implementation`` for the named operation.
``note`` is one line for ``attn-dispatch info`` (for example the kernel provider in use)."""


@dataclass(frozen=True)
class PluginSpec:
    """What a plugin says about itself before it is asked for anything. The host checks every field;
    a malformed spec marks the plugin ``failed`` with the reason.

    ``name``: the entry-point name, ``[a-z][a-z0-9_]*``; it also names the switch ``ATTN_DISPATCH_<NAME>``.
    ``archs``: a tuple (or list) of :data:`attn_dispatch.KNOWN_ARCHS` values it targets, never a bare
    str; on any other arch it is never asked to register.
    ``requires``: module names (``"pkg"`` or ``"pkg.sub"``) that must be findable; checked through the
    import system's finders without importing anything, not even ``pkg`` for ``"pkg.sub"``.
    ``settings``: its :class:`~attn_dispatch.settings.Setting` declarations; each is read from
    ``ATTN_DISPATCH_<NAME>_<SETTING>`` by the host and handed to ``attn_dispatch_register_ops``.
    """

    name: str
    archs: tuple[str, ...]
    requires: tuple[str, ...] = ()
    description: str = ""
    settings: tuple[Setting, ...] = ()


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

    Called: once per load, for every discovered plugin that is imported (not one switched off,
    shadowed or misnamed: those are never imported), before its registration, in the same bounded
    worker thread as ``attn_dispatch_register_ops``.
    Gets: the detected :class:`Hardware`.
    Returns: a :class:`PluginSpec`. Must not import heavy or optional libraries.
    """


@hookspec
def attn_dispatch_register_ops(hardware: Hardware, register: Register, settings: Mapping[str, object]) -> None:
    """Offer implementations of named operations (see :data:`attn_dispatch.ops.OP_GROUPS`).

    Called: once per load, only for plugins that are enabled, target ``hardware.arch`` and whose
    ``requires`` are findable; in a worker thread bounded by ``ATTN_DISPATCH_LOAD_TIMEOUT``.
    Gets: the detected :class:`Hardware`, the ``register`` callback, and ``settings``: the plugin's
    declared settings as parsed by the host (a read-only mapping, setting name -> value; an unreadable
    variable has already been warned about and replaced by the default), plus ``settings["strict"]``:
    the host's ``ATTN_DISPATCH_STRICT`` (a plugin may not declare a setting of that name), for problems a
    plugin meets after load, such as a configuration it knows its kernel gets wrong. Any argument may be
    omitted.
    ``register`` refuses an implementation whose signature differs from the op's spec: the plugin is
    then ``failed`` with the reason. Calling :func:`attn_dispatch.load` for the device being loaded
    raises :class:`attn_dispatch.PluginLoadError` (the plugin is marked ``failed``).
    Returns: nothing. To decline, raise :class:`MissingDependency` or :class:`NotThisArch` with a
    one-line reason; nothing it registered is kept. Any other exception marks the plugin ``failed``.
    A plugin registers every operation of a group or none of it: a plan made by one plugin is never
    consumed by another's kernel.
    """
