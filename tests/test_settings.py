"""The one settings model: parsing, the policy (warn + default, strict = error), plugin-declared
settings handed to the register hook, and where info shows them."""

from __future__ import annotations

import json
import logging

import pytest

import attn_dispatch
from attn_dispatch import Setting, cli, settings
from fault_dists import site  # noqa: F401  (fixture)


@pytest.mark.parametrize("text, value", [("1", True), ("0", False), (" TRUE ", True), ("off", False), ("Yes", True), ("no", False), ("On", True)])
def test_booleans_accepted(text, value):
    assert settings.parse_bool(text) is value


@pytest.mark.parametrize("text", ["2", "y", "enable", "", " ", "-1", "truee"])
def test_booleans_unreadable(text):
    with pytest.raises(ValueError, match="1/0, true/false, on/off or yes/no"):
        settings.parse_bool(text)


@pytest.mark.parametrize("text, level", [("info", logging.INFO), (" info", logging.INFO), ("10", 10), ("Warning", logging.WARNING)])
def test_log_levels(text, level):
    assert settings.parse_level(text) == level


@pytest.mark.parametrize(
    "setting, text, value",
    [
        (Setting("s", "a", choices=("a", "b")), " B ", "b"),
        (Setting("s", (), "list"), "x, y,,", ("x", "y")),
        (Setting("s", (), "list", choices=("x", "y")), "Y", ("y",)),
        (Setting("s", 1, "int"), " 7", 7),
        (Setting("s", 1.0, "seconds"), "0.5", 0.5),
        (Setting("s", "dflt"), " free text ", "free text"),
    ],
)
def test_parse_by_kind(setting, text, value):
    assert setting.parse(text) == value


@pytest.mark.parametrize(
    "setting, text",
    [(Setting("s", "a", choices=("a", "b")), "c"), (Setting("s", 1, "int"), "1.5"), (Setting("s", 1.0, "seconds"), "-1"), (Setting("s", 1.0, "seconds"), "nan")],
)
def test_read_unreadable_is_the_default_with_one_line(setting, text):
    value = settings.read(setting, "ATTN_DISPATCH_X_S", {"ATTN_DISPATCH_X_S": text})
    assert (value.value, value.source) == (setting.default, "default")
    assert value.problem.startswith(f"ATTN_DISPATCH_X_S={text!r} is unreadable (") and "\n" not in value.problem


@pytest.mark.parametrize(
    "setting",
    [Setting("s", 1, "str"), Setting("s", "1", "bool"), Setting("s", True, "int"), Setting("s", float("inf"), "float"),
     Setting("s", ["x"], "list"), Setting("s", ("z",), "list", choices=("x",)), Setting("s", -10, "level")],
)  # fmt: skip
def test_a_default_of_another_kind_is_a_malformed_declaration(setting):
    assert "is not a" in setting.problem()


def test_the_hosts_own_declarations_are_well_formed():
    assert [s.problem() for s in settings.HOST_SETTINGS + (settings.SWITCH,)] == [None] * (len(settings.HOST_SETTINGS) + 1)


def test_read_sources():
    setting = Setting("s", "a", choices=("a", "b"))
    assert settings.read(setting, "V", {}).source == "default"
    assert (settings.read(setting, "V", {"V": "b"}).value, settings.read(setting, "V", {"V": "b"}).source) == ("b", "env")


def test_strict_mode_reaches_the_register_hook_and_is_a_reserved_name(monkeypatch, site):
    site.plugin(
        "fault_strict",
        register_args="hardware, register, settings",
        register="import fault_strict_seen\nfault_strict_seen.SEEN = dict(settings)",
        top="import types; sys.modules.setdefault('fault_strict_seen', types.ModuleType('fault_strict_seen'))",
    )
    site.plugin("fault_claims_strict", settings="(Setting('strict', default=False, kind='bool'),)")
    monkeypatch.setenv("ATTN_DISPATCH_ARCH", "cpu")
    monkeypatch.setenv("ATTN_DISPATCH_STRICT", "1")
    monkeypatch.setenv("ATTN_DISPATCH_PLUGINS", "fault_strict")
    attn_dispatch.load(refresh=True)
    import fault_strict_seen

    assert fault_strict_seen.SEEN == {"strict": True}
    monkeypatch.delenv("ATTN_DISPATCH_STRICT")
    monkeypatch.setenv("ATTN_DISPATCH_PLUGINS", "fault_claims_strict")
    report = next(r for r in attn_dispatch.load(refresh=True).plugins if r.name == "fault_claims_strict")
    assert report.status == "failed" and "'strict' is reserved" in report.reason


def test_plugin_settings_reach_the_register_hook_parsed(monkeypatch, site):
    site.plugin(
        "fault_cfg",
        settings="(Setting('mode', default='a', choices=('a', 'b')), Setting('depth', default=2, kind='int'), Setting('fast', default=False, kind='bool'))",
        register_args="hardware, register, settings",
        register="import fault_cfg_seen\nfault_cfg_seen.SEEN = dict(settings)",
        top="import types; sys.modules.setdefault('fault_cfg_seen', types.ModuleType('fault_cfg_seen'))",
    )
    monkeypatch.setenv("ATTN_DISPATCH_ARCH", "cpu")
    monkeypatch.setenv("ATTN_DISPATCH_FAULT_CFG_MODE", "B")
    monkeypatch.setenv("ATTN_DISPATCH_FAULT_CFG_FAST", "yes")
    ops = attn_dispatch.load(refresh=True)
    import fault_cfg_seen

    assert fault_cfg_seen.SEEN == {"mode": "b", "depth": 2, "fast": True, "strict": False}  # plus the host's strict mode
    report = next(r for r in ops.plugins if r.name == "fault_cfg")
    shown = {v.variable: (v.value, v.source) for v in report.settings}
    assert shown == {
        "ATTN_DISPATCH_FAULT_CFG": (None, "default"),  # the switch
        "ATTN_DISPATCH_FAULT_CFG_MODE": ("b", "env"),
        "ATTN_DISPATCH_FAULT_CFG_DEPTH": (2, "default"),
        "ATTN_DISPATCH_FAULT_CFG_FAST": (True, "env"),
    }


def test_info_json_has_host_and_plugin_settings(monkeypatch, capsys):
    monkeypatch.setenv("ATTN_DISPATCH_ARCH", "cpu")
    monkeypatch.setenv("ATTN_DISPATCH_LOAD_TIMEOUT", "30")
    monkeypatch.setenv("ATTN_DISPATCH_VARLEN_DIFFUSION_STRATEGY", "qkv_pack")
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    host = {s["variable"]: s for s in info["settings"]}
    assert set(host) == {f"ATTN_DISPATCH_{n}" for n in ("STRICT", "ARCH", "PLUGINS", "DISABLE", "LOG_LEVEL", "LOAD_TIMEOUT")}
    assert host["ATTN_DISPATCH_LOAD_TIMEOUT"] | {"help": ""} == {
        "name": "load_timeout", "variable": "ATTN_DISPATCH_LOAD_TIMEOUT", "value": 30.0, "source": "env", "problem": "", "help": "",
    }  # fmt: skip
    assert host["ATTN_DISPATCH_STRICT"]["source"] == "default"
    varlen = next(p for p in info["plugins"] if p["name"] == "varlen_diffusion")
    strategy = next(s for s in varlen["settings"] if s["name"] == "strategy")
    assert (strategy["value"], strategy["source"]) == ("qkv_pack", "env")


def test_info_text_lists_settings_with_their_source(monkeypatch, capsys):
    monkeypatch.setenv("ATTN_DISPATCH_ARCH", "cpu")
    monkeypatch.setenv("ATTN_DISPATCH_LOAD_TIMEOUT", "later")
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    assert "ATTN_DISPATCH_STRICT" in text and "(default)" in text and "ATTN_DISPATCH_ARCH" in text and "= cpu  (env)" in text
    assert "ATTN_DISPATCH_LOAD_TIMEOUT='later' is unreadable" in text
    assert "ATTN_DISPATCH_VARLEN_DIFFUSION_STRATEGY" in text
