"""``attn-dispatch``: what was detected, which plugins loaded (and why not), and what each op resolved to.

    attn-dispatch info [--json] [--device cuda:0]
    attn-dispatch selfcheck [--device cuda:0]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

from . import plugins, selfcheck, settings
from .ops import Ops
from .settings import SettingValue

LOG_LEVEL = next(s for s in settings.HOST_SETTINGS if s.name == "log_level")


def info_dict(ops: Ops) -> dict:
    """The ``--json`` document: hardware, env, settings (the host's), plugins (each with its settings), ops."""
    env = {name: value for name, value in sorted(os.environ.items()) if name.upper().startswith(plugins.ENV_PREFIX)}
    return {
        "hardware": dataclasses.asdict(ops.hardware),
        "env": env,
        "settings": [dataclasses.asdict(value) for value in ops.settings],
        "plugins": [dataclasses.asdict(report) for report in ops.plugins],
        "ops": {op: dataclasses.asdict(res) for op, res in ops.resolutions.items()},
    }


def format_info(ops: Ops) -> str:
    lines = [f"hardware: {ops.hardware}", "", "settings:"]
    lines += [_setting_line(value) for value in ops.settings]
    lines += ["", "plugins:"]
    for p in ops.plugins or ():
        archs = ",".join(p.archs) or "-"
        reason = f"  ({p.reason})" if p.reason else ""
        dist = f"{p.distribution} {p.version}"
        lines.append(f"  {p.name:<18} {dist:<38} archs={archs:<12} {p.status}{reason}")
        lines += ["  " + _setting_line(value) for value in p.settings]
    if not ops.plugins:
        lines.append("  (none installed: pip install the plugins under plugins/)")
    lines += ["", "ops:"]
    for op, res in ops.resolutions.items():
        note = f"  [{res.note}]" if res.note else ""
        lines.append(f"  {op:<22} -> {res.plugin:<16} {res.function}{note}")
    return "\n".join(lines)


def _setting_line(value: SettingValue) -> str:
    if isinstance(value.value, tuple):
        shown = ",".join(value.value) or "(none)"
    elif value.variable.endswith("_LOG_LEVEL") and isinstance(value.value, int):
        shown = logging.getLevelName(value.value)  # WARNING, not 30 (a custom number shows as "Level 5")
    else:
        shown = "unset" if value.value is None else value.value
    source = "env" if value.source == "env" else "default"
    problem = f"; {value.problem}" if value.problem else ""
    return f"  {value.variable:<40} = {shown}  ({source}{problem})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="attn-dispatch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="hardware, plugins with status and reason, and the op resolution")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    check = sub.add_parser("selfcheck", help="run every resolved op against its reference on this device")
    for p in (info, check):
        p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: device 0, else the CPU)")
    args = parser.parse_args(argv)
    # An unreadable level falls back to WARNING; load() reports it with the other settings problems.
    level = settings.read(LOG_LEVEL, settings.host_variable(LOG_LEVEL.name), os.environ).value
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")

    try:
        ops = plugins.load(args.device)
    except (plugins.PluginLoadError, ValueError) as exc:
        print(f"attn-dispatch: {exc}", file=sys.stderr)
        return 2
    if args.command == "info":
        print(json.dumps(info_dict(ops), indent=2) if args.json else format_info(ops))
        return 0
    results = selfcheck.run(ops)
    print(f"self-check on {ops.hardware}")
    print(selfcheck.format_table(results))
    failed = [r for r in results if not r.passed]
    print(f"{len(results) - len(failed)}/{len(results)} checks passed")
    if note := selfcheck.note(ops):
        print(note)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
