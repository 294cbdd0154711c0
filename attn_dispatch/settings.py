"""One settings model: every ``ATTN_DISPATCH_*`` variable, the host's and the plugins', read one way.

A setting is declared once, as a :class:`Setting`: the host's in :data:`HOST_SETTINGS`, a plugin's in its
``PluginSpec(settings=...)``. :func:`read` turns the environment into a :class:`SettingValue` (the value
and where it came from), which ``attn-dispatch info`` reports. The policy is the same for all of them:

- unset: the default;
- unreadable (a bad boolean, a value outside ``choices``, not a number): one warning and the default, or
  an error (:class:`attn_dispatch.PluginLoadError`) under ``ATTN_DISPATCH_STRICT=1``;
- booleans: ``1/0``, ``true/false``, ``on/off``, ``yes/no``, in any case, spaces around ignored;
  anything else (``2``, ``y``, ``enable``, an empty string) is unreadable.

Variable names: ``ATTN_DISPATCH_<SETTING>`` for the host, ``ATTN_DISPATCH_<PLUGIN>`` for a plugin's
on/off switch and ``ATTN_DISPATCH_<PLUGIN>_<SETTING>`` for a plugin's settings, all upper case.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

PREFIX = "ATTN_DISPATCH_"
NAME_RE = re.compile(r"[a-z][a-z0-9_]*\Z")
"""Plugin and setting names: lower case letters, digits and ``_`` (they become upper-case variables)."""

KINDS = ("str", "bool", "int", "float", "seconds", "list", "level")
TRUE = ("1", "true", "on", "yes")
FALSE = ("0", "false", "off", "no")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass(frozen=True)
class Setting:
    """One setting, declared once. Its variable is named by the host (see the module docstring).

    ``kind``: ``str`` (stripped; lower-cased when there are ``choices``), ``bool``, ``int``, ``float``,
    ``seconds`` (a float >= 0), ``list`` (comma-separated, stripped, empties dropped: a tuple of str) or
    ``level`` (a logging level name or number). ``choices``: the allowed values of a ``str`` setting, or
    of each item of a ``list`` one; empty allows any. ``default``: the value when unset or unreadable
    (not parsed; None means "not set"). ``help``: one line for ``attn-dispatch info``.
    """

    name: str
    default: object = None
    kind: str = "str"
    choices: tuple[str, ...] = ()
    help: str = ""

    def problem(self) -> str | None:
        """Why this declaration is malformed, or None."""
        if not isinstance(self.name, str) or not NAME_RE.match(self.name):
            return f"setting name {self.name!r} is not lower case [a-z][a-z0-9_]*"
        if self.kind not in KINDS:
            return f"setting {self.name}: kind {self.kind!r} is not one of {', '.join(KINDS)}"
        if not isinstance(self.choices, (tuple, list)) or not all(isinstance(c, str) and c for c in self.choices):
            return f"setting {self.name}: choices must be a tuple of non-empty str, got {self.choices!r}"
        if self.choices and self.kind not in ("str", "list"):
            return f"setting {self.name}: choices apply to kind str or list only"
        if not isinstance(self.help, str):
            return f"setting {self.name}: help must be a str"
        if self.choices and self.kind == "str" and self.default is not None and self.default not in self.choices:
            return f"setting {self.name}: default {self.default!r} is not one of {', '.join(self.choices)}"
        if self.default is not None and not self._default_fits():
            # The default is reported as is (attn-dispatch info, its --json): a value of another kind
            # would break the report, so it is refused here, where the plugin is marked failed.
            return f"setting {self.name}: default {self.default!r} is not a {self.kind} value (or None)"
        return None

    def _default_fits(self) -> bool:
        """Whether ``default`` is a value :meth:`parse` could return for this kind."""
        d = self.default
        number = isinstance(d, (int, float)) and not isinstance(d, bool)
        if self.kind == "str":
            return isinstance(d, str)
        if self.kind == "bool":
            return isinstance(d, bool)
        if self.kind in ("int", "level"):
            return isinstance(d, int) and not isinstance(d, bool) and (self.kind == "int" or d >= 0)
        if self.kind in ("float", "seconds"):
            return number and math.isfinite(d) and (self.kind == "float" or d >= 0)
        # list: a tuple of str, each among the choices when there are some
        return isinstance(d, tuple) and all(isinstance(i, str) and (not self.choices or i in self.choices) for i in d)

    def parse(self, text: str) -> object:
        """The value ``text`` (a variable's content) means; ValueError saying what is accepted."""
        value = text.strip()
        if self.kind == "bool":
            return parse_bool(value)
        if self.kind == "list":
            items = tuple(item.strip() for item in value.split(",") if item.strip())
            if self.choices:
                items = tuple(item.lower() for item in items)
                bad = [item for item in items if item not in self.choices]
                if bad:
                    raise ValueError(f"{', '.join(bad)} not among {', '.join(self.choices)}")
            return items
        if self.kind in ("int", "float", "seconds"):
            try:
                number = int(value) if self.kind == "int" else float(value)
            except ValueError:
                raise ValueError(f"expected {'an integer' if self.kind == 'int' else 'a number'}") from None
            if not math.isfinite(number) or (self.kind == "seconds" and number < 0):
                raise ValueError("expected a finite number" + (" >= 0" if self.kind == "seconds" else ""))
            return number
        if self.kind == "level":
            return parse_level(value)
        if self.choices:
            if value.lower() not in self.choices:
                raise ValueError(f"expected one of {', '.join(self.choices)}")
            return value.lower()
        return value


@dataclass(frozen=True)
class SettingValue:
    """A setting as read for one load: its value and where the value came from.

    ``source`` is ``"env"`` (the variable was set and readable) or ``"default"`` (unset, or unreadable:
    then ``problem`` says why, in one line, naming the variable).
    """

    name: str
    variable: str
    value: object
    source: str
    problem: str = ""
    help: str = ""


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise ValueError("expected 1/0, true/false, on/off or yes/no")


def parse_level(text: str) -> int:
    """A logging level: a standard name (any case) or a non-negative integer."""
    value = text.strip()
    if value.isdigit():
        return int(value)
    if value.upper() in LEVELS:
        return logging.getLevelName(value.upper())
    raise ValueError(f"expected one of {', '.join(LEVELS)} or a number")


def read(setting: Setting, variable: str, environ: Mapping[str, str]) -> SettingValue:
    """Read ``setting`` from ``environ[variable]`` by the module's policy (never raises)."""
    raw = environ.get(variable)
    if raw is None:
        return SettingValue(setting.name, variable, setting.default, "default", help=setting.help)
    try:
        value = setting.parse(raw)
    except ValueError as exc:
        problem = f"{variable}={raw!r} is unreadable ({exc}); using the default {setting.default!r}"
        return SettingValue(setting.name, variable, setting.default, "default", problem, setting.help)
    return SettingValue(setting.name, variable, value, "env", help=setting.help)


def host_variable(name: str) -> str:
    return PREFIX + name.upper()


def plugin_variable(plugin: str, name: str = "") -> str:
    """``ATTN_DISPATCH_<PLUGIN>`` (the switch) or ``ATTN_DISPATCH_<PLUGIN>_<NAME>`` (a setting)."""
    return PREFIX + plugin.upper() + (f"_{name.upper()}" if name else "")


HOST_SETTINGS: tuple[Setting, ...] = (
    Setting("strict", False, "bool", help="raise PluginLoadError on any plugin or settings problem"),
    Setting("arch", None, help="override the detected arch of GPU devices (tests, simulation)"),
    Setting("plugins", None, "list", help="keep only these plugins (set but empty: none); unset keeps all"),
    Setting("disable", (), "list", help="switch these plugins off"),
    Setting("log_level", logging.WARNING, "level", help="log level of the attn-dispatch CLI"),
    Setting("load_timeout", 120.0, "seconds", help="seconds one plugin may take to import and register (0: no bound, in the calling thread)"),
)
HOST_VARIABLES = frozenset(host_variable(s.name) for s in HOST_SETTINGS)
SWITCH = Setting("switch", None, "bool", help="switch this plugin on (1) or off (0), whatever the lists say")


def read_host(environ: Mapping[str, str]) -> dict[str, SettingValue]:
    """Every host setting, by name."""
    return {s.name: read(s, host_variable(s.name), environ) for s in HOST_SETTINGS}


def read_plugin(plugin: str, declared: tuple[Setting, ...], environ: Mapping[str, str]) -> dict[str, SettingValue]:
    """A plugin's declared settings, by name."""
    return {s.name: read(s, plugin_variable(plugin, s.name), environ) for s in declared}


def unknown_variables(
    environ: Mapping[str, str], plugins: Mapping[str, tuple[str, ...] | None]
) -> list[str]:
    """One line per ``ATTN_DISPATCH_*`` variable that nothing reads (a typo must not pass in silence).

    ``plugins`` maps each installed plugin's name to the names of its declared settings, or to None when
    they are unknown (the plugin was not imported): then any ``ATTN_DISPATCH_<PLUGIN>_*`` passes.
    """
    known = ", ".join(sorted(plugins)) or "none installed"
    problems = []
    for variable in sorted(environ):
        if not variable.upper().startswith(PREFIX):
            continue
        if variable != variable.upper():
            problems.append(f"{variable} is ignored: variable names are upper case ({variable.upper()})")
            continue
        if variable in HOST_VARIABLES:
            continue
        suffix = variable[len(PREFIX) :].lower()
        owners = [p for p in plugins if suffix == p or suffix.startswith(p + "_")]
        if not owners:
            problems.append(f"{variable} matches no installed plugin and no host setting (known: {known})")
            continue
        owner = max(owners, key=len)  # ROCM_NSA is rocm_nsa's switch even if a plugin "rocm" exists
        declared = plugins[owner]
        rest = suffix[len(owner) + 1 :]
        if rest and declared is not None and rest not in declared:
            listing = ", ".join(declared) or "none"
            problems.append(f"{variable} is not a setting of plugin {owner} (its settings: {listing})")
    return problems
