"""The plugin host: entry-point discovery, switches, registration once per device, and the report.

``load()`` is the only entry an engine needs::

    ops = attn_dispatch.load()          # once, at start-up (cached per device, thread-safe)
    ops.paged_attention_out(q, k_cache, v_cache, out, plan=plan)   # per layer: a plain call

Which plugins run (strongest first):

1. ``ATTN_DISPATCH_<NAME>=1|0`` switches one plugin on or off, whatever the two lists say.
2. ``ATTN_DISPATCH_DISABLE=a,b`` switches the listed plugins off.
3. ``ATTN_DISPATCH_PLUGINS=a,b`` keeps only the listed plugins; set but empty keeps none; unset keeps all.

A plugin switched off is not imported at all. Every variable is read by :mod:`attn_dispatch.settings`.

Nothing a plugin does makes ``load()`` raise or hang: each plugin is imported and asked to register in
a worker thread bounded by ``ATTN_DISPATCH_LOAD_TIMEOUT``, and whatever goes wrong becomes its report's
status and reason (:mod:`attn_dispatch.loader`), logged once. ``ATTN_DISPATCH_STRICT=1`` turns every
problem (a failed, shadowed or misnamed plugin, a plugin asked for by name that is unavailable, an
unreadable or unknown variable) into one :class:`PluginLoadError` listing them all.

Two distributions exposing one entry-point name: the one that owns the name (its distribution is named
``<name>`` or ``attn-dispatch-<name>``, any of ``-_.``) loads and the others are ``shadowed``; when no
single one owns it, none loads and all are ``shadowed``. Two plugins offering one op group: the first by
name keeps it; the other is ``conflict`` (or ``active`` for the groups it kept), naming the winner.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import pluggy

from . import hookspecs, loader, settings
from .hardware import detect
from .hookspecs import PROJECT
from .loader import ACTIVE, CONFLICT, DISABLED_BY_ENV, FAILED, INVALID_NAME, MISSING_DEPENDENCY, NOT_THIS_ARCH, SHADOWED
from .ops import GROUP_OF, OP_GROUPS, REFERENCE, Ops, Resolution, function_name, reference_resolutions
from .settings import SettingValue

__all__ = ["ACTIVE", "CONFLICT", "DISABLED_BY_ENV", "FAILED", "INVALID_NAME", "MISSING_DEPENDENCY", "NOT_THIS_ARCH", "SHADOWED"]

log = logging.getLogger("attn_dispatch")

ENTRY_POINT_GROUP = "attn_dispatch"
ENV_PREFIX = settings.PREFIX
ENV_PLUGINS, ENV_DISABLE, ENV_STRICT = (settings.host_variable(n) for n in ("plugins", "disable", "strict"))
PROBLEMS = (FAILED, SHADOWED, INVALID_NAME)  # statuses that are errors under strict mode


class PluginLoadError(RuntimeError):
    """Strict mode: every problem of one load, in one message. Also: ``load()`` re-entered from a hook."""


@dataclass(frozen=True)
class PluginReport:
    """What happened to one discovered plugin in one load, and why (``status``: see ``loader.STATUSES``)."""

    name: str
    distribution: str
    version: str
    archs: tuple[str, ...]  # empty when its spec was not read (switched off, failed before)
    status: str
    reason: str = ""
    ops: tuple[str, ...] = ()
    requested: bool = False  # named in ATTN_DISPATCH_PLUGINS or switched on by ATTN_DISPATCH_<NAME>=1
    settings: tuple[SettingValue, ...] = ()  # its switch, then its declared settings as read


def make_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def entry_points() -> list[importlib.metadata.EntryPoint]:
    """Installed plugins, sorted by name then distribution, so nothing depends on install order."""
    return sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: (ep.name, _dist(ep)))


# Locks: one re-entrant lock per device, so a cached load never waits behind another device's build;
# _guard only protects the lock table. Both are made anew in a forked child (a lock held by a parent's
# thread would never be released there).
_guard = threading.Lock()
_device_locks: dict[int | None, threading.RLock] = {}
_loaded: dict[int | None, Ops] = {}
_logged: set[str] = set()
_generation = 0  # bumped by every build and reset: caches of Ops elsewhere compare it (generation())


def _after_fork_in_child() -> None:
    global _guard, _device_locks
    _guard, _device_locks = threading.Lock(), {}
    loader.forget_builds()


os.register_at_fork(after_in_child=_after_fork_in_child)


def load(device: object = None, *, refresh: bool = False) -> Ops:
    """Detect the hardware, load the plugins and return the resolved :class:`Ops` for ``device``.

    ``device``: None (device 0, or the CPU when there is no GPU), an index >= 0, ``"cpu"``, ``"cuda"``,
    ``"cuda:N"`` or a ``torch.device``; anything else is a ``ValueError``. Cached per device: later calls
    return the same object, without waiting for another device's load. ``refresh=True`` reads the
    environment again and rebuilds this device's :class:`Ops` (and logs its problems again); objects
    already handed out keep working unchanged.

    Raises only :class:`PluginLoadError` (strict mode; an unreadable ``ATTN_DISPATCH_STRICT``, which
    cannot be read as off; or called from a plugin's hook for the device being loaded) and ``ValueError``
    (``device``, or an unknown ``ATTN_DISPATCH_ARCH``), never because of what a plugin does.
    """
    index = device_index(device)
    if index in loader.building():
        raise PluginLoadError(f"load({device!r}) called from a plugin hook while that device's plugins load; call it after start-up")
    if not refresh and (ops := _loaded.get(index)) is not None:
        return ops
    with _device_lock(index):
        if refresh or (ops := _loaded.get(index)) is None:
            if refresh:
                _logged.clear()
            ops = _loaded[index] = _build(index)
            _bump_generation()
        return ops


def reset() -> None:
    """Forget every loaded :class:`Ops` and what was logged, so the next ``load()`` rebuilds and logs
    again (tests; objects already handed out keep working)."""
    with _guard:
        _loaded.clear()
        _logged.clear()
    _bump_generation()


def generation() -> int:
    """A number that changes whenever a load builds or :func:`reset` forgets: a cache of what ``load()``
    returned stays valid while it is unchanged (the diffusers backend caches its op group this way)."""
    return _generation


def _bump_generation() -> None:
    global _generation
    with _guard:
        _generation += 1


def list_plugins(device: object = None) -> tuple[PluginReport, ...]:
    return load(device).plugins


def device_index(device: object) -> int | None:
    """The cache key of ``device``: a visible-GPU index, or None for the CPU."""
    if device is None:
        return 0
    if isinstance(device, int) and not isinstance(device, bool) and device >= 0:
        return device
    kind, _, number = str(device).partition(":")
    if isinstance(device, (str, _torch_device_type())) and (not number or number.isdigit()):
        if kind == "cpu" and number in ("", "0"):
            return None
        if kind in ("cuda", "hip"):
            return int(number) if number else 0
    raise ValueError(f"device: expected None, an index >= 0, 'cpu', 'cuda', 'cuda:N' or a torch.device, got {device!r}")


def _torch_device_type() -> type:
    torch = sys.modules.get("torch")  # never import torch just to check an argument
    return torch.device if torch is not None else str


def _device_lock(index: int | None) -> threading.RLock:
    with _guard:
        return _device_locks.setdefault(index, threading.RLock())


def _build(index: int | None) -> Ops:
    environ = dict(os.environ)  # one snapshot: every setting of this load is read from it
    hardware = detect(index, environ)
    host = settings.read_host(environ)
    if host["strict"].problem:  # cannot tell whether strict mode is wanted: refuse rather than guess
        raise PluginLoadError(f"{host['strict'].problem.split(';')[0]}; set it to 1 or 0")
    strict = bool(host["strict"].value)
    problems = [value.problem for value in host.values() if value.problem]

    by_name: dict[str, list[importlib.metadata.EntryPoint]] = {}
    for ep in entry_points():
        by_name.setdefault(ep.name, []).append(ep)
    valid = [name for name in by_name if _name_problem(name) is None]
    problems += _list_problems(host, valid)

    attempts: dict[str, loader.Attempt] = {}
    reports: list[PluginReport] = []
    chosen: dict[str, tuple[Callable, Resolution]] = {}
    timeout, devices = host["load_timeout"].value, loader.building() | {index}  # hooks see this load's devices
    for name, eps in by_name.items():
        switch = settings.read(settings.SWITCH, settings.plugin_variable(name), environ)
        if switch.problem:
            problems.append(switch.problem)
        enabled, why, requested = _decision(name, switch, host)
        for ep, status, reason in _pick(name, eps):
            if status is None and not enabled:
                status, reason = DISABLED_BY_ENV, why
            if status is not None:  # not imported
                reports.append(_report(ep, status, reason, requested=requested, settings=(switch,)))
                continue
            attempt = attempts[name] = loader.activate(ep, hardware, environ, make_plugin_manager(), timeout, devices)
            status, reason, taken = _settle(name, attempt, chosen)
            shadows = [f"also exposed by {_dist(other)} {_version(other)} (shadowed)" for other in eps if other is not ep]
            problems += [value.problem for value in attempt.settings if value.problem]
            reason = "; ".join(filter(None, [reason, *shadows]))
            reports.append(_report(ep, status, reason, attempt.archs, taken, requested, (switch, *attempt.settings)))

    declared = {name: (attempts[name].declared if name in attempts else None) for name in valid}
    problems += settings.unknown_variables(environ, declared)
    for report in reports:
        if report.status in PROBLEMS:
            problems.append(f"plugin {report.name} {report.status}: {report.reason}")
        elif report.requested and report.status != ACTIVE:
            problems.append(f"plugin {report.name} was asked for but is {report.status}: {report.reason}")
        elif report.status in (NOT_THIS_ARCH, MISSING_DEPENDENCY):
            _log_once(logging.INFO, f"plugin {report.name} {report.status}: {report.reason}")
        elif report.status == CONFLICT or (report.status == ACTIVE and report.reason):
            _log_once(logging.WARNING, f"plugin {report.name} {report.status}: {report.reason}")
    if strict and problems:
        raise PluginLoadError(f"{ENV_STRICT}=1: {len(problems)} problem(s): " + "; ".join(problems))
    for problem in problems:
        _log_once(logging.WARNING, problem)

    impls, resolutions = dict(REFERENCE), reference_resolutions()
    for op, (fn, resolution) in chosen.items():
        impls[op], resolutions[op] = fn, resolution
    ops = Ops(**impls, hardware=hardware, resolutions=resolutions, plugins=tuple(reports), settings=tuple(host.values()))
    log.info(ops.summary())
    return ops


def _settle(name: str, attempt: loader.Attempt, chosen: dict[str, tuple[Callable, Resolution]]) -> tuple[str, str, tuple[str, ...]]:
    """Give an active plugin the op groups nobody took before it: (status, reason, ops taken)."""
    if attempt.status != ACTIVE:
        return attempt.status, attempt.reason, ()
    taken: list[str] = []
    lost: list[str] = []
    for group in sorted({GROUP_OF[op] for op in attempt.staged}):
        owner = next((chosen[op][1].plugin for op in OP_GROUPS[group] if op in chosen), None)
        if owner is not None:
            lost.append(f"group {group} already provided by {owner}")
            continue
        for op in OP_GROUPS[group]:
            fn, note = attempt.staged[op]
            chosen[op] = (fn, Resolution(op, name, function_name(fn), note))
            taken.append(op)
    if lost:
        reason = "; ".join(lost) + " (the first plugin by name keeps a group)"
        return (ACTIVE if taken else CONFLICT), reason, tuple(taken)
    return ACTIVE, "", tuple(taken)


def _pick(name: str, eps: list[importlib.metadata.EntryPoint]) -> list[tuple[importlib.metadata.EntryPoint, str | None, str]]:
    """(entry point, status or None to go on and load it, reason) for each distribution exposing ``name``."""
    if (problem := _name_problem(name)) is not None:
        return [(ep, INVALID_NAME, f"{problem}; rename it in {_dist(ep)}") for ep in eps]
    if len(eps) == 1:
        return [(eps[0], None, "")]
    listing = ", ".join(f"{_dist(ep)} {_version(ep)}" for ep in eps)
    owners = [ep for ep in eps if _owns(_dist(ep), name)]
    if len(owners) != 1:
        reason = f"entry point {name!r} is exposed by {listing}, and not exactly one owns the name; none is loaded: uninstall the others"
        return [(ep, SHADOWED, reason) for ep in eps]
    owner = owners[0]
    reason = f"entry point {name!r} is also exposed by {_dist(owner)} {_version(owner)}, which owns the name and is loaded instead"
    return [(ep, None, "") if ep is owner else (ep, SHADOWED, reason) for ep in eps]


def _owns(distribution: str, name: str) -> bool:
    normal = re.sub(r"[-_.]+", "-", distribution).lower()
    return normal in (name.replace("_", "-"), "attn-dispatch-" + name.replace("_", "-"))


def _name_problem(name: str) -> str | None:
    if not loader.valid_name(name):
        return f"entry point name {name!r} is not lower case [a-z][a-z0-9_]* (it names ATTN_DISPATCH_<NAME>)"
    if settings.host_variable(name) in settings.HOST_VARIABLES:
        return f"entry point name {name!r} is taken by the host setting {settings.host_variable(name)}"
    return None


def _decision(name: str, switch: SettingValue, host: Mapping[str, SettingValue]) -> tuple[bool, str, bool]:
    """(enabled, why, requested by name) for one plugin, by the precedence in this module's docstring."""
    if switch.source == "env":
        return bool(switch.value), f"{switch.variable}={'1' if switch.value else '0'}", bool(switch.value)
    if name in [n.lower() for n in host["disable"].value]:
        return False, f"listed in {ENV_DISABLE}", False
    allow = host["plugins"].value
    if allow is not None and name not in [n.lower() for n in allow]:
        return False, f"not in {ENV_PLUGINS}={','.join(allow)!r}", False
    return True, "", allow is not None


def _list_problems(host: Mapping[str, SettingValue], known: list[str]) -> list[str]:
    """Names in the two lists that match no installed plugin (a typo must not be silently ignored)."""
    listing = ", ".join(known) or "none installed"
    problems = []
    for key in ("plugins", "disable"):
        for name in host[key].value or ():
            if name.lower() not in known:
                problems.append(f"{host[key].variable} names {name!r}, which matches no installed plugin (known: {listing})")
    return problems


def _report(ep, status, reason, archs=(), ops=(), requested=False, settings=()) -> PluginReport:
    return PluginReport(ep.name, _dist(ep), _version(ep), tuple(archs), status, reason, tuple(ops), requested, tuple(settings))


def _dist(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return (dist.metadata["Name"] or "?") if dist is not None else "?"


def _version(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.version if dist is not None else "?"


def _log_once(level: int, message: str) -> None:
    with _guard:
        if message in _logged:
            return
        _logged.add(message)
    log.log(level, message)
