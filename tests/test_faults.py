"""Fault injection: throwaway plugin distributions that misbehave; load() must report, never raise or hang
(strict mode excepted). One test per defect of issue 10's host list."""

from __future__ import annotations

import os
import sys
import threading
import time
import types

import pytest

import attn_dispatch
from attn_dispatch import PluginLoadError, reference
from fault_dists import site  # noqa: F401  (fixture)
from loading import by_name, load_cpu

REAL = {"cuda_fa3", "rocm_mxfp4", "rocm_nsa", "varlen_diffusion"}


def within(seconds: float, fn, *args, **kwargs):
    """fn's result, or a test failure if it takes longer (the old host hung forever here)."""
    box: dict = {}

    def run():
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds}s"
    if "error" in box:
        raise box["error"]
    return box["result"]


@pytest.fixture
def gate(monkeypatch):
    """An event a plugin can wait on (``import fault_gate; fault_gate.EVENT.wait()``); set at teardown."""
    module = types.ModuleType("fault_gate")
    module.EVENT, module.ENTERED, module.ARMED = threading.Event(), threading.Event(), threading.Event()
    monkeypatch.setitem(sys.modules, "fault_gate", module)
    yield module
    module.EVENT.set()


# --- 1. malformed PluginSpec ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, reason",
    [
        ("archs=None", "archs: expected a non-empty tuple of known archs"),
        ("archs=5", "archs: expected"),
        ("archs='cpu'", "archs: expected a non-empty tuple of known archs (sm70"),  # not the archs c, p, u
        ("archs=('cpu', 'sm999')", "archs: expected"),
        ("requires=None", "requires: expected a tuple of module names, got None"),
        ("requires=(1,)", "requires: expected a tuple of module names, got (1,)"),
        ("settings=('strategy',)", "settings: expected a tuple of Setting"),
        ("settings=(Setting('Bad'),)", "setting name 'Bad' is not lower case"),
        ("settings=(Setting('s', default='x', choices=('a', 'b')),)", "default 'x' is not one of a, b"),
        ("settings=(Setting('s', kind='colour'),)", "kind 'colour'"),
        # a default that is not a value of its kind would break attn-dispatch info (text and --json)
        ("settings=(Setting('n', default=(1, 2), kind='list'),)", "default (1, 2) is not a list value"),
        ("settings=(Setting('o', default=object()),)", "is not a str value"),
        ("settings=(Setting('t', default=-1.0, kind='seconds'),)", "default -1.0 is not a seconds value"),
        ("description=3", "description: expected a str"),
    ],
)
def test_malformed_spec_is_a_failed_plugin_not_a_crash(monkeypatch, site, field, reason):
    archs = "" if field.startswith("archs=") else "archs=('cpu',), "
    site.plugin("fault_spec", spec=f"PluginSpec(name='fault_spec', {archs}{field})")
    ops = load_cpu(monkeypatch)
    report = by_name(ops)["fault_spec"]
    assert report.status == "failed"
    assert reason in report.reason and report.reason.startswith("malformed PluginSpec: ")
    assert REAL <= set(by_name(ops))  # the others still load


def test_a_setting_that_would_read_a_host_variable_is_refused(monkeypatch, site):
    """Plugin "load" + setting "timeout" = ATTN_DISPATCH_LOAD_TIMEOUT: the host's, not the plugin's."""
    site.plugin("load", settings="(Setting('timeout', default='1'),)")
    report = by_name(load_cpu(monkeypatch))["load"]
    assert report.status == "failed"
    assert "would read ATTN_DISPATCH_LOAD_TIMEOUT, a host setting" in report.reason


def test_malformed_spec_in_info_is_a_line_not_a_traceback(monkeypatch, site, capsys):
    from attn_dispatch import cli

    site.plugin("fault_spec", archs="None")
    monkeypatch.setenv("ATTN_DISPATCH_ARCH", "cpu")
    assert cli.main(["info"]) == 0
    assert "fault_spec" in capsys.readouterr().out


def test_requires_a_dotted_name_imports_nothing(monkeypatch, site):
    site.dist("fault-pkg", {}, {"fault_pkg/__init__.py": "raise RuntimeError('fault_pkg imported')\n", "fault_pkg/sub.py": ""})
    site.plugin("fault_req", requires="('fault_pkg.sub',)")
    site.plugin("fault_req_missing", requires="('fault_pkg.nosuch', 'fault_pkg_nosuch.sub')")
    reports = by_name(load_cpu(monkeypatch))
    assert reports["fault_req"].status == "active"
    assert reports["fault_req_missing"].status == "missing-dependency"
    assert reports["fault_req_missing"].reason == "fault_pkg.nosuch, fault_pkg_nosuch.sub not installed"
    assert "fault_pkg" not in sys.modules


# --- 2. duplicate entry-point names, names that are not lower case ---------------------------------------


@pytest.mark.parametrize("impostor", ["aaa-first", "zzz-last"])  # sorts before and after the real one
@pytest.mark.parametrize("name, owner", [("cuda_fa3", "attn-dispatch-cuda-fa3"), ("fault_owned", "attn-dispatch-fault-owned")])
def test_a_second_distribution_never_replaces_the_real_plugin(monkeypatch, site, impostor, name, owner):
    if name != "cuda_fa3":
        site.plugin(name, dist=owner, module="fault_owner")
    site.plugin(name, dist=impostor, module="fault_impostor")
    reports = [r for r in load_cpu(monkeypatch).plugins if r.name == name]
    assert [r.distribution for r in reports if r.status == "shadowed"] == [impostor]
    shadowed = next(r for r in reports if r.status == "shadowed")
    assert f"also exposed by {owner}" in shadowed.reason and "owns the name" in shadowed.reason
    real = next(r for r in reports if r.status != "shadowed")
    assert real.distribution == owner and f"also exposed by {impostor} 1.0 (shadowed)" in real.reason
    if name != "cuda_fa3":  # the real plugin's own status does not depend on this tree's other work
        assert real.status == "active"
    assert "fault_impostor" not in sys.modules


def test_duplicates_with_no_owner_are_all_refused_loudly(monkeypatch, site):
    site.plugin("fault_dup", dist="one-dist", module="fault_dup_one")
    site.plugin("fault_dup", dist="two-dist", module="fault_dup_two")
    reports = [r for r in load_cpu(monkeypatch).plugins if r.name == "fault_dup"]
    assert [r.status for r in reports] == ["shadowed", "shadowed"]
    assert "exposed by one-dist 1.0, two-dist 1.0" in reports[0].reason and "none is loaded" in reports[0].reason
    with pytest.raises(PluginLoadError, match="plugin fault_dup shadowed"):
        load_cpu(monkeypatch, ATTN_DISPATCH_STRICT="1")


@pytest.mark.parametrize("name", ["FaultUpper", "fault-dash", "strict", "9lives"])
def test_entry_point_names_must_be_lower_case_identifiers(monkeypatch, site, name):
    site.plugin(name, module="fault_badname")
    report = by_name(load_cpu(monkeypatch))[name]
    assert report.status == "invalid-name"
    assert "fault-" + name in report.reason  # names the distribution to fix
    assert "fault_badname" not in sys.modules  # never imported


def test_op_conflict_names_the_winner_on_the_loser(monkeypatch, site):
    register = "register('mla_v_up_proj', reference.mla_v_up_proj)"
    site.plugin("fault_a", register=register)
    site.plugin("fault_b", register=register)
    ops = load_cpu(monkeypatch)
    a, b = by_name(ops)["fault_a"], by_name(ops)["fault_b"]
    assert (a.status, a.ops) == ("active", ("mla_v_up_proj",))
    assert (b.status, b.ops) == ("conflict", ())
    assert "group mla_v_up_proj already provided by fault_a" in b.reason
    assert ops.resolutions["mla_v_up_proj"].plugin == "fault_a"


# --- 3. everything a plugin raises, pluggy's validation, register()'s signature check ----------------------


@pytest.mark.parametrize(
    "where, parts, reason",
    [
        ("import", {"top": "raise SystemExit(3)"}, "import failed: SystemExit: 3"),
        ("spec", {"spec": "sys.exit('bye')"}, "attn_dispatch_plugin_spec raised SystemExit: bye"),
        ("register", {"register": "raise SystemExit"}, "attn_dispatch_register_ops raised SystemExit"),
        ("register", {"register": "raise GeneratorExit('odd')"}, "raised GeneratorExit: odd"),
    ],
)
def test_system_exit_from_a_plugin_is_reported(monkeypatch, site, where, parts, reason):
    site.plugin("fault_exit", **parts)
    report = by_name(load_cpu(monkeypatch))["fault_exit"]
    assert (report.status, report.reason) == ("failed", reason)


@pytest.mark.parametrize("status", ["active", "bogus", None])
def test_a_decline_with_a_status_of_its_own_is_a_failure(monkeypatch, site, status):
    top = f"class Odd(attn_dispatch.PluginUnavailable):\n    status = {status!r}\n"
    site.plugin("fault_odd", top=top, register="raise Odd('nope')")
    report = by_name(load_cpu(monkeypatch))["fault_odd"]
    assert (report.status, report.reason) == ("failed", f"declined with status {status!r}: nope")
    with pytest.raises(PluginLoadError, match="plugin fault_odd failed"):
        load_cpu(monkeypatch, ATTN_DISPATCH_STRICT="1")


def test_a_hookimpl_with_wrong_argument_names_is_reported_as_such(monkeypatch, site):
    site.plugin("fault_args", register_args="hardware, register, device")
    report = by_name(load_cpu(monkeypatch))["fault_args"]
    assert report.status == "failed"
    assert report.reason.startswith("invalid hook implementation: ") and "device" in report.reason


def test_a_misspelt_hook_is_reported(monkeypatch, site):
    site.plugin("fault_typo", top="@hookimpl\ndef attn_dispatch_register_op(hardware): pass\n")
    report = by_name(load_cpu(monkeypatch))["fault_typo"]
    assert report.status == "failed" and "attn_dispatch_register_op" in report.reason


def test_register_refuses_a_signature_that_differs_from_the_spec(monkeypatch, site):
    site.plugin("fault_sig", register="register('mla_v_up_proj', lambda x: x)")
    ops = load_cpu(monkeypatch)
    report = by_name(ops)["fault_sig"]
    assert report.status == "failed" and report.reason.startswith("register('mla_v_up_proj'): ")
    assert ops.mla_v_up_proj is reference.mla_v_up_proj


# --- 4. hangs and locks ----------------------------------------------------------------------------------


def test_a_plugin_calling_load_from_its_hook_is_refused_not_deadlocked(monkeypatch, site):
    site.plugin("fault_reenter", register="attn_dispatch.load()")
    monkeypatch.setenv("ATTN_DISPATCH_ARCH", "cpu")
    report = by_name(within(20, attn_dispatch.load, refresh=True))["fault_reenter"]
    assert report.status == "failed"
    assert "PluginLoadError: load(None) called from a plugin hook" in report.reason


@pytest.mark.parametrize("timeout", ["120", "0"])  # 0: hooks run in the calling thread
def test_re_entry_is_refused_with_or_without_the_worker_thread(monkeypatch, site, timeout):
    site.plugin("fault_reenter", register="attn_dispatch.load(refresh=True)")
    report = by_name(within(20, load_cpu, monkeypatch, ATTN_DISPATCH_LOAD_TIMEOUT=timeout))["fault_reenter"]
    assert report.status == "failed" and "called from a plugin hook" in report.reason
    assert attn_dispatch.load() is not None  # and the device is not left marked as loading


def test_a_plugin_that_hangs_at_import_is_timed_out(monkeypatch, site, gate):
    site.plugin("fault_hang", top="import fault_gate\nfault_gate.EVENT.wait()")
    monkeypatch.setenv("ATTN_DISPATCH_LOAD_TIMEOUT", "0.5")
    monkeypatch.setenv("ATTN_DISPATCH_ARCH", "cpu")
    ops = within(20, attn_dispatch.load, refresh=True)
    report = by_name(ops)["fault_hang"]
    assert (report.status, report.reason.split(" (")[0]) == ("failed", "timed out after 0.5s importing or registering")
    assert REAL <= set(by_name(ops))


def test_a_cached_load_does_not_wait_behind_another_devices_build(monkeypatch, site, gate):
    site.plugin("fault_slow", register="import fault_gate\nif fault_gate.ARMED.is_set():\n    fault_gate.ENTERED.set(); fault_gate.EVENT.wait()")
    monkeypatch.setenv("ATTN_DISPATCH_ARCH", "cpu")  # device 0 simulates the CPU arch; "cpu" is the CPU
    cpu = attn_dispatch.load("cpu")
    gate.ARMED.set()  # from now on the plugin blocks in its register hook
    builder = threading.Thread(target=attn_dispatch.load, args=(0,), daemon=True)
    builder.start()
    assert gate.ENTERED.wait(10)
    assert within(5, attn_dispatch.load, "cpu") is cpu
    gate.EVENT.set()
    builder.join(10)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_while_another_thread_loads_does_not_hang_the_child(monkeypatch, site, gate):
    site.plugin("fault_slow", register="import fault_gate\nfault_gate.ENTERED.set(); fault_gate.EVENT.wait()")
    monkeypatch.setenv("ATTN_DISPATCH_ARCH", "cpu")
    builder = threading.Thread(target=attn_dispatch.load, daemon=True)
    builder.start()
    assert gate.ENTERED.wait(10)
    pid = os.fork()
    if pid == 0:  # the child: its copy of the lock was held by a thread that does not exist here
        os.environ["ATTN_DISPATCH_FAULT_SLOW"] = "0"
        try:
            ok = attn_dispatch.load(refresh=True).hardware.arch == "cpu"
        finally:
            os._exit(0 if ok else 1)
    deadline = time.monotonic() + 30
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    gate.EVENT.set()
    builder.join(10)
    assert done[0] == pid and os.waitstatus_to_exitcode(done[1]) == 0


# --- 5. settings under strict mode ---------------------------------------------------------------------


@pytest.mark.parametrize("value", ["2", "y", "enable", ""])
def test_an_unreadable_strict_flag_is_an_error_not_off(monkeypatch, value):
    with pytest.raises(PluginLoadError, match="ATTN_DISPATCH_STRICT="):
        load_cpu(monkeypatch, ATTN_DISPATCH_STRICT=value)


@pytest.mark.parametrize(
    "variable, value, message",
    [
        ("ATTN_DISPATCH_CUDA_FA3", "2", "ATTN_DISPATCH_CUDA_FA3='2' is unreadable"),
        ("ATTN_DISPATCH_CUDA_FA3", "", "ATTN_DISPATCH_CUDA_FA3='' is unreadable"),
        ("ATTN_DISPATCH_cuda_fa3", "0", "ATTN_DISPATCH_cuda_fa3 is ignored: variable names are upper case"),
        ("ATTN_DISPATCH_FAULT_SET_ENABLED", "0", "ATTN_DISPATCH_FAULT_SET_ENABLED is not a setting of plugin fault_set"),
        ("ATTN_DISPATCH_FAULT_SET_MODE", "c", "ATTN_DISPATCH_FAULT_SET_MODE='c' is unreadable"),
        ("ATTN_DISPATCH_NO_SUCH", "1", "ATTN_DISPATCH_NO_SUCH matches no installed plugin"),
        ("ATTN_DISPATCH_LOAD_TIMEOUT", "soon", "ATTN_DISPATCH_LOAD_TIMEOUT='soon' is unreadable"),
        ("ATTN_DISPATCH_VARLEN_DIFFUSION_STRATEGY", "fast", "ATTN_DISPATCH_VARLEN_DIFFUSION_STRATEGY='fast' is unreadable"),
    ],
)
def test_unreadable_or_unknown_variables_warn_once_and_are_errors_when_strict(monkeypatch, site, caplog, variable, value, message):
    site.plugin("fault_set", settings="(Setting('mode', default='a', choices=('a', 'b')),)")
    with caplog.at_level("WARNING", logger="attn_dispatch"):
        load_cpu(monkeypatch, **{variable: value})
    assert sum(message in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(PluginLoadError) as error:
        load_cpu(monkeypatch, ATTN_DISPATCH_STRICT="1")
    assert message in str(error.value)
    assert str(error.value).count(message) == 1


def test_strict_error_is_one_message(monkeypatch, site, caplog):
    site.plugin("fault_raise", register="raise RuntimeError('boom')")
    with caplog.at_level("WARNING", logger="attn_dispatch"), pytest.raises(PluginLoadError) as error:
        load_cpu(monkeypatch, ATTN_DISPATCH_STRICT="1", ATTN_DISPATCH_PLUGINS="fault_raise")
    assert str(error.value) == (
        "ATTN_DISPATCH_STRICT=1: 1 problem(s): plugin fault_raise failed: attn_dispatch_register_ops raised RuntimeError: boom"
    )
    assert not [r for r in caplog.records if "boom" in r.getMessage()]  # raised, not also logged


# --- 6. devices and the arch override -------------------------------------------------------------------


def test_arch_override_applies_to_gpu_devices_only(monkeypatch):
    monkeypatch.setenv("ATTN_DISPATCH_ARCH", "sm90")
    assert attn_dispatch.load("cpu").hardware == attn_dispatch.CPU
    assert attn_dispatch.load(0).hardware.arch == "sm90"


@pytest.mark.parametrize("device", [-1, True, False, 1.0, "cuda:-1", "cpu:1", "gpu"])
def test_bad_devices_are_value_errors_naming_device(device):
    with pytest.raises(ValueError, match="^device: "):
        attn_dispatch.load(device)


@pytest.mark.parametrize("value", ["sm90:foo", "cpu:x", "sm90:"])
def test_arch_suffixes_are_for_gfx_only(monkeypatch, value):
    monkeypatch.setenv("ATTN_DISPATCH_ARCH", value)
    with pytest.raises(ValueError, match="ATTN_DISPATCH_ARCH="):
        attn_dispatch.load(0)
