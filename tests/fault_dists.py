"""Throwaway plugin distributions for fault injection, made at test time (no pip install).

A :class:`Site` is a directory on ``sys.path`` holding ``<dist>-<version>.dist-info`` folders (METADATA
and entry_points.txt) beside the plugins' modules, so ``importlib.metadata`` discovers them exactly as
it discovers installed plugins, next to the real ones.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

GROUP = "attn_dispatch"


class Site:
    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        monkeypatch.syspath_prepend(str(root))  # also invalidates the import caches

    def dist(self, dist: str, entry_points: dict[str, str], files: dict[str, str], version: str = "1.0") -> None:
        """Install distribution ``dist``: entry point name -> "module:attr", and file path -> source."""
        info = self.root / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        lines = [f"[{GROUP}]", *(f"{name} = {target}" for name, target in entry_points.items())]
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
        for path, source in files.items():
            file = self.root / path
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(textwrap.dedent(source))

    def plugin(self, name: str, *, dist: str | None = None, module: str | None = None, **parts: str) -> None:
        """A one-module plugin distribution; ``parts`` override pieces of :func:`plugin_source`."""
        module = module or f"fault_{name.lower().replace('-', '_')}"
        self.dist(dist or f"fault-{name}", {name: module}, {f"{module}.py": plugin_source(name, **parts)})

    def forget_modules(self) -> None:
        """Drop the modules imported from this site (the next test may reuse a name)."""
        for key, module in list(sys.modules.items()):
            if str(getattr(module, "__file__", "") or "").startswith(str(self.root)):
                del sys.modules[key]


def plugin_source(
    name: str,
    *,
    top: str = "",
    spec: str = "",
    archs: str = "('cpu',)",
    requires: str = "()",
    settings: str = "()",
    register_args: str = "hardware, register",
    register: str = "pass",
) -> str:
    """A plugin module; ``spec`` replaces the whole PluginSpec expression, ``register`` the hook's body."""
    declared = f", settings={settings}" if settings != "()" else ""
    spec = spec or f"PluginSpec(name={name!r}, archs={archs}, requires={requires}{declared})"
    body = textwrap.indent(textwrap.dedent(register).strip(), " " * 4)
    return (
        "import sys, threading, time\n"
        "import attn_dispatch\n"
        "from attn_dispatch import PluginSpec, hookimpl, reference\n"
        "Setting = getattr(attn_dispatch, 'Setting', None)  # absent before the settings model\n"
        f"{textwrap.dedent(top)}\n"
        "@hookimpl\n"
        "def attn_dispatch_plugin_spec(hardware):\n"
        f"    return {spec}\n\n"
        "@hookimpl\n"
        f"def attn_dispatch_register_ops({register_args}):\n"
        f"{body}\n"
    )


@pytest.fixture
def site(tmp_path, monkeypatch):
    made = Site(tmp_path / "site", monkeypatch)
    yield made
    made.forget_modules()
