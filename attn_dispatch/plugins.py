"""The plugin host: entry-point discovery, environment toggles, registration once, and the listing.

``load()`` is the only entry an engine needs::

    ops = attn_dispatch.load()          # once, at start-up (cached per device, thread-safe)
    ops.paged_attention_out(q, k_cache, v_cache, out, plan=plan)   # per layer: a plain call

Environment (precedence from strongest to weakest):

1. ``ATTN_DISPATCH_<NAME>=1|0`` switches one plugin on or off, whatever the two lists say.
2. ``ATTN_DISPATCH_DISABLE=a,b`` switches the listed plugins off.
3. ``ATTN_DISPATCH_PLUGINS=a,b`` keeps only the listed plugins; set but empty keeps none; unset keeps all.

A plugin switched off is not imported at all. A name in any of them that matches no installed plugin is
warned about, with the known names.
``ATTN_DISPATCH_STRICT=1`` raises :class:`PluginLoadError` when a plugin fails to load or a plugin asked
for by name (in ``ATTN_DISPATCH_PLUGINS`` or by ``ATTN_DISPATCH_<NAME>=1``) is unavailable. Without it,
the failure is recorded in the plugin's report, logged once, and the original path is used.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import pluggy

from . import hookspecs
from .hardware import ARCH_ENV, Hardware, detect
from .hookspecs import PROJECT, PluginSpec, PluginUnavailable
from .ops import GROUP_OF, OP_GROUPS, OP_NAMES, REFERENCE, Ops, Resolution, function_name, reference_resolutions

log = logging.getLogger("attn_dispatch")

ENTRY_POINT_GROUP = "attn_dispatch"
ENV_PREFIX = "ATTN_DISPATCH_"
ENV_PLUGINS = "ATTN_DISPATCH_PLUGINS"
ENV_DISABLE = "ATTN_DISPATCH_DISABLE"
ENV_STRICT = "ATTN_DISPATCH_STRICT"
HOST_ENV = (ARCH_ENV, ENV_PLUGINS, ENV_DISABLE, ENV_STRICT, "ATTN_DISPATCH_LOG_LEVEL")

ACTIVE = "active"
NOT_THIS_ARCH = "not-this-arch"
DISABLED_BY_ENV = "disabled-by-env"
MISSING_DEPENDENCY = "missing-dependency"
FAILED = "failed"

_TRUE = ("1", "true", "on", "yes")
_FALSE = ("0", "false", "off", "no")


class PluginLoadError(RuntimeError):
    """Strict mode only: a plugin failed, or a plugin asked for by name is unavailable."""


@dataclass(frozen=True)
class PluginReport:
    """What happened to one discovered plugin in one load, and why."""

    name: str
    distribution: str
    version: str
    archs: tuple[str, ...]
    status: str
    reason: str = ""
    ops: tuple[str, ...] = ()
    requested: bool = False  # named in ATTN_DISPATCH_PLUGINS or switched on by ATTN_DISPATCH_<NAME>=1


def make_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def entry_points() -> list[importlib.metadata.EntryPoint]:
    """Installed plugins, sorted by name so resolution does not depend on install order."""
    return sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


_lock = threading.Lock()
_loaded: dict[int | None, Ops] = {}
_logged: set[tuple[str, str]] = set()


def load(device: object = None, *, refresh: bool = False) -> Ops:
    """Detect the hardware, load the plugins and return the resolved :class:`Ops` for ``device``.

    ``device``: None (device 0, or the CPU when there is no GPU), an index, ``"cuda:1"``, ``"cpu"`` or a
    ``torch.device``. Cached per device: later calls return the same object; ``refresh=True`` reloads
    (after changing the environment, say).
    """
    index = device_index(device)
    with _lock:
        if refresh or index not in _loaded:
            _loaded[index] = _build(index)
        return _loaded[index]


def reset() -> None:
    """Forget every loaded :class:`Ops` (tests, or an engine that changes the environment)."""
    with _lock:
        _loaded.clear()
        _logged.clear()


def list_plugins(device: object = None) -> tuple[PluginReport, ...]:
    return load(device).plugins


def device_index(device: object) -> int | None:
    if device is None:
        return 0
    if isinstance(device, int):
        return device
    text = str(device)
    if text == "cpu":
        return None
    kind, _, number = text.partition(":")
    if kind not in ("cuda", "hip") or (number and not number.isdigit()):
        raise ValueError(f"device: expected None, an index, 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return int(number) if number else 0


def _build(index: int | None) -> Ops:
    hardware = detect(index)
    strict = _flag(ENV_STRICT)
    pm = make_plugin_manager()
    found = entry_points()
    problems = _unknown_env_names([ep.name for ep in found])
    for problem in problems:
        _log_once(logging.WARNING, "env", problem)

    chosen: dict[str, tuple[Callable, Resolution]] = {}
    reports = []
    for ep in found:
        report = _activate(pm, ep, hardware, chosen)
        reports.append(report)
        if report.status == FAILED:
            problems.append(f"plugin {report.name} failed: {report.reason}")
        elif report.requested and report.status != ACTIVE:
            problems.append(f"plugin {report.name} was asked for but is {report.status}: {report.reason}")
    if strict and problems:
        raise PluginLoadError(f"{ENV_STRICT}=1 and: " + "; ".join(problems))

    impls = dict(REFERENCE)
    resolutions = reference_resolutions()
    for op, (fn, resolution) in chosen.items():
        impls[op] = fn
        resolutions[op] = resolution
    ops = Ops(**impls, hardware=hardware, resolutions=resolutions, plugins=tuple(reports))
    log.info(ops.summary())
    return ops


def _activate(
    pm: pluggy.PluginManager,
    ep: importlib.metadata.EntryPoint,
    hardware: Hardware,
    chosen: dict[str, tuple[Callable, Resolution]],
) -> PluginReport:
    """Toggle, import, describe and register one plugin; every outcome is a report, never an exception."""
    name = ep.name
    dist = getattr(ep, "dist", None)
    distribution, version = (dist.metadata["Name"], dist.version) if dist is not None else ("?", "?")
    enabled, env_reason, requested = _env_decision(name)

    def report(status: str, reason: str = "", archs: tuple[str, ...] = (), ops: tuple[str, ...] = ()) -> PluginReport:
        if status not in (ACTIVE, DISABLED_BY_ENV):
            _log_once(logging.WARNING if status == FAILED else logging.INFO, name, f"plugin {name} {status}: {reason}")
        return PluginReport(name, distribution, version, archs, status, reason, ops, requested)

    if not enabled:  # not even imported: switching a plugin off must also avoid its import-time side effects
        return report(DISABLED_BY_ENV, env_reason)
    try:
        module = ep.load()
        pm.register(module, name=name)
    except Exception as exc:  # one broken plugin is recorded; the others still load
        return report(FAILED, f"import failed: {type(exc).__name__}: {exc}")
    try:
        specs = _call_one(pm, "attn_dispatch_plugin_spec", module, hardware=hardware)
    except Exception as exc:
        return report(FAILED, f"attn_dispatch_plugin_spec raised {type(exc).__name__}: {exc}")
    spec = specs[0] if specs else None
    if not isinstance(spec, PluginSpec):
        return report(FAILED, f"attn_dispatch_plugin_spec returned {type(spec).__name__}, not a PluginSpec")
    archs = tuple(spec.archs)
    if spec.name != name:
        return report(FAILED, f"entry point {name!r} describes itself as {spec.name!r}", archs)
    if hardware.arch not in archs:
        return report(NOT_THIS_ARCH, f"targets {', '.join(archs)}; this device is {hardware.arch}", archs)
    missing = [requirement for requirement in spec.requires if not _importable(requirement)]
    if missing:
        return report(MISSING_DEPENDENCY, f"{', '.join(missing)} not installed", archs)

    staged: dict[str, tuple[Callable, str]] = {}

    def register(op: str, implementation: Callable, *, note: str = "") -> None:
        if op not in OP_NAMES:
            raise ValueError(f"register: unknown op {op!r}; known ops: {', '.join(OP_NAMES)}")
        if not callable(implementation):
            raise TypeError(f"register: implementation of {op!r} is not callable")
        staged[op] = (implementation, note)

    try:
        _call_one(pm, "attn_dispatch_register_ops", module, hardware=hardware, register=register)
    except PluginUnavailable as exc:
        return report(exc.status, str(exc), archs)
    except Exception as exc:
        return report(FAILED, f"attn_dispatch_register_ops raised {type(exc).__name__}: {exc}", archs)

    groups = {GROUP_OF[op] for op in staged}
    for group in sorted(groups):
        missing_ops = [op for op in OP_GROUPS[group] if op not in staged]
        if missing_ops:
            return report(FAILED, f"registered part of group {group}; missing {', '.join(missing_ops)}", archs)
    taken = []
    for group in sorted(groups):
        owner = next((chosen[op][1].plugin for op in OP_GROUPS[group] if op in chosen), None)
        if owner is not None:
            _log_once(logging.WARNING, name, f"plugin {name}: group {group} already provided by {owner}; keeping {owner}")
            continue
        for op in OP_GROUPS[group]:
            fn, note = staged[op]
            chosen[op] = (fn, Resolution(op, name, function_name(fn), note))
            taken.append(op)
    return report(ACTIVE, "", archs, tuple(taken))


def _call_one(pm: pluggy.PluginManager, hook_name: str, plugin: object, **kwargs) -> list:
    """Call one plugin's implementation of a hook (through pluggy, so tracing sees it); load time only."""
    others = [p for p in pm.get_plugins() if p is not plugin]
    return pm.subset_hook_caller(hook_name, remove_plugins=others)(**kwargs)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _flag(var: str) -> bool:
    return os.environ.get(var, "").strip().lower() in _TRUE


def _names(var: str) -> list[str] | None:
    value = os.environ.get(var)
    if value is None:
        return None
    return [name.strip().lower() for name in value.split(",") if name.strip()]


def _switch_var(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _env_decision(name: str) -> tuple[bool, str, bool]:
    """(enabled, why, requested by name) for one plugin, by the precedence in this module's docstring."""
    var = _switch_var(name)
    value = os.environ.get(var)
    if value is not None and value.strip().lower() in _TRUE + _FALSE:
        on = value.strip().lower() in _TRUE
        return on, f"{var}={value}", on
    if value is not None:
        _log_once(logging.WARNING, var, f"{var}={value!r} is neither 0 nor 1; ignored")
    if name in (_names(ENV_DISABLE) or ()):
        return False, f"listed in {ENV_DISABLE}", False
    allow = _names(ENV_PLUGINS)
    if allow is not None and name not in allow:
        return False, f"not in {ENV_PLUGINS}={os.environ[ENV_PLUGINS]!r}", False
    return True, "", allow is not None


def _unknown_env_names(known: Iterable[str]) -> list[str]:
    """Names in the toggles that match no installed plugin (a typo must not be silently ignored)."""
    known = list(known)
    listing = ", ".join(known) or "none installed"
    problems = []
    for var in (ENV_PLUGINS, ENV_DISABLE):
        for name in _names(var) or ():
            if name not in known:
                problems.append(f"{var} names {name!r}, which matches no installed plugin (known: {listing})")
    for var in sorted(os.environ):
        if not var.startswith(ENV_PREFIX) or var in HOST_ENV:
            continue
        suffix = var[len(ENV_PREFIX) :].lower()
        # ATTN_DISPATCH_<PLUGIN>_<SETTING> belongs to that plugin (e.g. ..._VARLEN_DIFFUSION_STRATEGY).
        if any(suffix == name or suffix.startswith(name + "_") for name in known):
            continue
        problems.append(f"{var} matches no installed plugin (known: {listing})")
    return problems


def _log_once(level: int, key: str, message: str) -> None:
    if (key, message) not in _logged:
        _logged.add((key, message))
        log.log(level, message)
