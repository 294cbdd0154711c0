"""Activating one plugin: import it, read and check its spec and settings, let it register, in a bounded
worker thread. Every outcome is an :class:`Attempt`; nothing a plugin does escapes as an exception
(``KeyboardInterrupt`` excepted: it is re-raised in the caller; ``SystemExit`` is caught).

The worker thread bounds a plugin that hangs (at import, in a hook) by ``ATTN_DISPATCH_LOAD_TIMEOUT``
seconds. Python cannot kill a thread: on timeout the plugin is ``failed`` and its thread is left behind
(a daemon thread, so it does not keep the interpreter alive); whatever it registers later is ignored.
"""

from __future__ import annotations

import importlib.metadata
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import pluggy

from . import opspecs
from .hardware import KNOWN_ARCHS, Hardware
from .hookspecs import PluginSpec, PluginUnavailable
from .ops import GROUP_OF, OP_GROUPS, OP_NAMES
from .settings import HOST_VARIABLES, NAME_RE, Setting, SettingValue, plugin_variable, read_host, read_plugin

STRICT = "strict"  # the key under which register_ops' settings carry ATTN_DISPATCH_STRICT

# Statuses of a plugin in one load (PluginReport.status).
ACTIVE = "active"  # provides every op in PluginReport.ops (the reason names groups another plugin kept)
NOT_THIS_ARCH = "not-this-arch"
DISABLED_BY_ENV = "disabled-by-env"  # switched off: not imported
MISSING_DEPENDENCY = "missing-dependency"
FAILED = "failed"  # import, hook, spec, settings or registration problem, or timed out
SHADOWED = "shadowed"  # another distribution exposes the same entry-point name: see plugins.py
INVALID_NAME = "invalid-name"  # the entry-point name is not [a-z][a-z0-9_]* or is a host setting's name
CONFLICT = "conflict"  # every group it offered was already provided by another plugin (named in the reason)
DECLINES = (FAILED, MISSING_DEPENDENCY, NOT_THIS_ARCH)  # what PluginUnavailable's subclasses may report
STATUSES = (ACTIVE, NOT_THIS_ARCH, DISABLED_BY_ENV, MISSING_DEPENDENCY, FAILED, SHADOWED, INVALID_NAME, CONFLICT)

# Caught at each step, to say which step failed; any other BaseException but KeyboardInterrupt is caught
# around the whole activation (see activate).
CAUGHT = (Exception, SystemExit)

_state = threading.local()  # .building: the devices whose load this thread is part of (re-entry check)


def building() -> frozenset:
    """The device keys being loaded by this thread or by the load that started it."""
    return getattr(_state, "building", frozenset())


def forget_builds() -> None:
    """After a fork: the child runs no load, whatever its parent's threads were doing."""
    global _state
    _state = threading.local()


@dataclass
class Attempt:
    """What activating one plugin produced, before op conflicts between plugins are settled."""

    status: str
    reason: str = ""
    archs: tuple[str, ...] = ()
    settings: tuple[SettingValue, ...] = ()
    declared: tuple[str, ...] | None = None  # its settings' names; None when its spec was not read
    staged: dict[str, tuple[Callable, str]] = field(default_factory=dict)  # op -> (implementation, note)


def activate(
    ep: importlib.metadata.EntryPoint,
    hardware: Hardware,
    environ: Mapping[str, str],
    pm: pluggy.PluginManager,
    timeout: float,
    devices: frozenset,
) -> Attempt:
    """Run :func:`attempt` in a daemon thread for at most ``timeout`` seconds (0: in this thread, unbounded).

    ``devices``: the device keys being loaded (the worker inherits them, so a hook that calls
    ``load()`` for one of them is refused instead of deadlocking).
    """
    if not timeout:  # 0: no bound, run here (a debugger, or a library that must import on the main thread)
        previous, _state.building = building(), devices
        try:
            return attempt(ep, hardware, environ, pm)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            return Attempt(FAILED, f"raised {describe(exc)}")
        finally:
            _state.building = previous
    box: dict[str, object] = {}

    def work() -> None:
        _state.building = devices
        try:
            box["attempt"] = attempt(ep, hardware, environ, pm)
        except KeyboardInterrupt as exc:  # the user's, not the plugin's: handed to the caller
            box["error"] = exc
        except BaseException as exc:  # GeneratorExit, a framework's own BaseException, ...
            box["attempt"] = Attempt(FAILED, f"raised {describe(exc)}")

    worker = threading.Thread(target=work, name=f"attn_dispatch plugin {ep.name}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        reason = f"timed out after {timeout:g}s importing or registering (ATTN_DISPATCH_LOAD_TIMEOUT); its thread is left running"
        return Attempt(FAILED, reason)
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["attempt"]  # type: ignore[return-value]


def attempt(ep: importlib.metadata.EntryPoint, hardware: Hardware, environ: Mapping[str, str], pm: pluggy.PluginManager) -> Attempt:
    """Import, describe, check and register one plugin (in the calling thread)."""
    name = ep.name
    try:
        module = ep.load()
    except CAUGHT as exc:
        return Attempt(FAILED, f"import failed: {describe(exc)}")
    try:
        pm.register(module, name=name)
        pm.check_pending()  # a hookimpl whose name matches no hook (a typo) is an error, not a no-op
    except pluggy.PluginValidationError as exc:
        return Attempt(FAILED, f"invalid hook implementation: {exc}")
    except CAUGHT as exc:
        return Attempt(FAILED, f"its hooks could not be registered: {describe(exc)}")
    try:
        specs = pm.hook.attn_dispatch_plugin_spec(hardware=hardware)
    except CAUGHT as exc:
        return Attempt(FAILED, f"attn_dispatch_plugin_spec raised {describe(exc)}")
    if not specs:
        return Attempt(FAILED, "implements no attn_dispatch_plugin_spec hook")
    problem = spec_problem(specs[0], name)
    if problem:
        return Attempt(FAILED, f"malformed PluginSpec: {problem}")
    spec: PluginSpec = specs[0]
    values = read_plugin(name, tuple(spec.settings), environ)
    done = dict(archs=tuple(spec.archs), settings=tuple(values.values()), declared=tuple(values))
    if hardware.arch not in spec.archs:
        return Attempt(NOT_THIS_ARCH, f"targets {', '.join(spec.archs)}; this device is {hardware.arch}", **done)
    missing = [module for module in spec.requires if not findable(module)]
    if missing:
        return Attempt(MISSING_DEPENDENCY, f"{', '.join(missing)} not installed", **done)

    staged: dict[str, tuple[Callable, str]] = {}
    refused: list[str] = []

    def register(op: str, implementation: Callable, *, note: str = "") -> None:
        if op not in OP_NAMES:
            refused.append(f"register({op!r}): unknown op; known ops: {', '.join(OP_NAMES)}")
        elif not callable(implementation):
            refused.append(f"register({op!r}): the implementation is not callable")
        elif problem := opspecs.signature_problem(op, implementation):
            refused.append(f"register({op!r}): {problem}")
        else:
            staged[op] = (implementation, str(note))

    # Plus the host's strict mode, for errors only a plugin can see later (a guarded configuration, say).
    settings = MappingProxyType({**{key: value.value for key, value in values.items()}, STRICT: _strict(environ)})
    try:
        pm.hook.attn_dispatch_register_ops(hardware=hardware, register=register, settings=settings)
    except PluginUnavailable as exc:  # a subclass may set any status: only the three declines are taken
        status = exc.status if exc.status in DECLINES else FAILED
        return Attempt(status, str(exc) if status == exc.status else f"declined with status {exc.status!r}: {exc}", **done)
    except CAUGHT as exc:
        return Attempt(FAILED, f"attn_dispatch_register_ops raised {describe(exc)}", **done)
    if refused:
        return Attempt(FAILED, "; ".join(refused), **done)
    for group in sorted({GROUP_OF[op] for op in staged}):
        missing_ops = [op for op in OP_GROUPS[group] if op not in staged]
        if missing_ops:
            return Attempt(FAILED, f"registered part of group {group}; missing {', '.join(missing_ops)}", **done)
    return Attempt(ACTIVE, "", staged=staged, **done)


def spec_problem(spec: object, name: str) -> str | None:
    """Why ``spec`` is not a well-formed :class:`PluginSpec` for entry point ``name``, or None."""
    if not isinstance(spec, PluginSpec):
        return f"attn_dispatch_plugin_spec returned {type(spec).__name__}, not a PluginSpec"
    if spec.name != name:
        return f"entry point {name!r} describes itself as {spec.name!r}"
    archs = spec.archs
    if not isinstance(archs, (tuple, list)) or not archs or not all(isinstance(a, str) and a in KNOWN_ARCHS for a in archs):
        return f"archs: expected a non-empty tuple of known archs ({', '.join(KNOWN_ARCHS)}), got {archs!r}"
    requires = spec.requires
    if not isinstance(requires, (tuple, list)) or not all(isinstance(r, str) and _dotted(r) for r in requires):
        return f"requires: expected a tuple of module names, got {requires!r}"
    if not isinstance(spec.description, str):
        return f"description: expected a str, got {type(spec.description).__name__}"
    declared = spec.settings
    if not isinstance(declared, (tuple, list)) or not all(isinstance(s, Setting) for s in declared):
        return f"settings: expected a tuple of Setting, got {declared!r}"
    for setting in declared:
        if problem := setting.problem():
            return f"settings: {problem}"
    names = [s.name for s in declared]
    if len(set(names)) != len(names):
        return f"settings: names repeat: {', '.join(names)}"
    if STRICT in names:
        return f"settings: {STRICT!r} is reserved: register_ops receives the host's strict mode under that name"
    for setting in declared:  # a plugin "load" with a setting "timeout" would read ATTN_DISPATCH_LOAD_TIMEOUT
        if (variable := plugin_variable(name, setting.name)) in HOST_VARIABLES:
            return f"settings: {setting.name!r} would read {variable}, a host setting"
    return None


def _strict(environ: Mapping[str, str]) -> bool:
    return bool(read_host(environ)[STRICT].value)  # load() has already refused an unreadable value


def valid_name(name: str) -> bool:
    return bool(NAME_RE.match(name))


def findable(module: str) -> bool:
    """Whether ``module`` could be imported, asking the import system's finders; nothing is imported.

    For ``"pkg.sub"`` the parent's search path comes from its spec, so ``pkg/__init__.py`` is not run.
    """
    path = None
    parts = module.split(".")
    for depth in range(1, len(parts) + 1):
        name = ".".join(parts[:depth])
        if name in sys.modules:
            if sys.modules[name] is None:  # blocked on purpose
                return False
            path = getattr(sys.modules[name], "__path__", None)
        else:
            spec = _find_spec(name, path)
            if spec is None:
                return False
            path = spec.submodule_search_locations
        if depth < len(parts) and path is None:  # a module, not a package: it has no submodules
            return False
    return True


def _find_spec(name: str, path: object) -> object:
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        if find is None:
            continue
        try:
            spec = find(name, path)
        except CAUGHT:  # a broken finder says nothing about this module
            continue
        if spec is not None:
            return spec
    return None


def _dotted(module: str) -> bool:
    return all(part.isidentifier() for part in module.split("."))


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
