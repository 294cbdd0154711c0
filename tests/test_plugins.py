import importlib.metadata
import logging

import pytest
import torch

import attn_dispatch
import fake_plugins
from loading import by_name, load_cpu
from attn_dispatch import plugins, reference

REAL_PLUGINS = {"cuda_fa3", "rocm_mxfp4", "rocm_nsa", "varlen_diffusion"}


def add_entry_points(monkeypatch, **fakes: str):
    """Install extra entry points (name -> 'module:attr') beside the really installed ones."""
    real = importlib.metadata.entry_points(group=plugins.ENTRY_POINT_GROUP)
    extra = [importlib.metadata.EntryPoint(name, value, plugins.ENTRY_POINT_GROUP) for name, value in fakes.items()]
    monkeypatch.setattr(plugins, "entry_points", lambda: sorted([*real, *extra], key=lambda ep: ep.name))


def test_discovers_the_four_real_plugins_and_a_test_plugin(monkeypatch):
    add_entry_points(monkeypatch, test_query="fake_plugins:query_plugin")
    reports = by_name(load_cpu(monkeypatch))
    assert REAL_PLUGINS <= set(reports)
    for name in REAL_PLUGINS:
        assert reports[name].status == "not-this-arch"
        assert reports[name].distribution == "attn-dispatch-" + name.replace("_", "-")
        assert "this device is cpu" in reports[name].reason
    assert reports["test_query"].status == "active"
    assert reports["test_query"].ops == ("mla_query_for_backend", "mla_decode_query")


def test_active_plugin_resolves_its_group_and_leaves_the_rest_on_the_reference(monkeypatch):
    add_entry_points(monkeypatch, test_query="fake_plugins:query_plugin")
    ops = load_cpu(monkeypatch)
    assert ops.mla_decode_query is fake_plugins.scaled_decode_query
    assert ops.resolutions["mla_decode_query"].plugin == "test_query"
    assert ops.resolutions["mla_decode_query"].note == "test"
    assert ops.masked_attention is reference.masked_attention
    assert ops.resolutions["masked_attention"].plugin == "reference"


def test_load_is_cached_per_device_and_refresh_reloads(monkeypatch):
    monkeypatch.setenv("ATTN_DISPATCH_ARCH", "cpu")
    first = attn_dispatch.load()
    assert attn_dispatch.load() is first
    assert attn_dispatch.load(0) is first
    assert attn_dispatch.load(refresh=True) is not first
    assert attn_dispatch.load("cpu") is not first  # another device key


def test_load_is_thread_safe(monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("ATTN_DISPATCH_ARCH", "cpu")
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: attn_dispatch.load(), range(32)))
    assert all(ops is results[0] for ops in results)


def test_bad_device_argument():
    with pytest.raises(ValueError, match="device"):
        attn_dispatch.load("tpu:0")


@pytest.mark.parametrize(
    "env, enabled",
    [
        ({}, True),
        ({"ATTN_DISPATCH_PLUGINS": ""}, False),  # set but empty: none
        ({"ATTN_DISPATCH_PLUGINS": "test_query"}, True),
        ({"ATTN_DISPATCH_PLUGINS": "cuda_fa3"}, False),
        ({"ATTN_DISPATCH_DISABLE": "test_query"}, False),
        ({"ATTN_DISPATCH_DISABLE": "test_query", "ATTN_DISPATCH_PLUGINS": "test_query"}, False),  # block beats allow
        ({"ATTN_DISPATCH_TEST_QUERY": "0"}, False),
        ({"ATTN_DISPATCH_TEST_QUERY": "0", "ATTN_DISPATCH_PLUGINS": "test_query"}, False),  # switch beats lists
        ({"ATTN_DISPATCH_TEST_QUERY": "1", "ATTN_DISPATCH_DISABLE": "test_query"}, True),
        ({"ATTN_DISPATCH_TEST_QUERY": "1", "ATTN_DISPATCH_PLUGINS": ""}, True),
    ],
)
def test_toggle_precedence(monkeypatch, env, enabled):
    add_entry_points(monkeypatch, test_query="fake_plugins:query_plugin")
    report = by_name(load_cpu(monkeypatch, **env))["test_query"]
    assert report.status == ("active" if enabled else "disabled-by-env")
    if not enabled:
        assert report.reason  # says which variable decided


def test_disabled_plugin_is_never_asked_to_register(monkeypatch):
    add_entry_points(monkeypatch, test_query="fake_plugins:query_plugin")
    before = fake_plugins.query_plugin.register_calls
    load_cpu(monkeypatch, ATTN_DISPATCH_TEST_QUERY="0")
    assert fake_plugins.query_plugin.register_calls == before


@pytest.mark.parametrize(
    "env, warned",
    [
        ({"ATTN_DISPATCH_PLUGINS": "cuda_fa3,cuda_fa33"}, "ATTN_DISPATCH_PLUGINS names 'cuda_fa33'"),
        ({"ATTN_DISPATCH_DISABLE": "rocm"}, "ATTN_DISPATCH_DISABLE names 'rocm'"),
        ({"ATTN_DISPATCH_CUDAFA3": "0"}, "ATTN_DISPATCH_CUDAFA3 matches no installed plugin"),
    ],
)
def test_unknown_names_are_warned_with_the_known_plugins(monkeypatch, caplog, env, warned):
    with caplog.at_level(logging.WARNING, logger="attn_dispatch"):
        load_cpu(monkeypatch, **env)
    message = next(r.getMessage() for r in caplog.records if warned in r.getMessage())
    assert "known: cuda_fa3, rocm_mxfp4, rocm_nsa, varlen_diffusion" in message


def test_plugin_settings_and_host_variables_are_not_unknown(monkeypatch, caplog):
    with caplog.at_level(logging.WARNING, logger="attn_dispatch"):
        load_cpu(monkeypatch, ATTN_DISPATCH_VARLEN_DIFFUSION_STRATEGY="kv_pack", ATTN_DISPATCH_STRICT="0")
    assert not [r for r in caplog.records if "matches no installed plugin" in r.getMessage()]


def test_unknown_name_is_an_error_in_strict_mode(monkeypatch):
    with pytest.raises(attn_dispatch.PluginLoadError, match="cuda_fa33"):
        load_cpu(monkeypatch, ATTN_DISPATCH_PLUGINS="cuda_fa33", ATTN_DISPATCH_STRICT="1")


def test_plugin_that_raises_on_import_is_reported_not_raised(monkeypatch, caplog):
    add_entry_points(monkeypatch, broken="fake_broken_plugin", test_query="fake_plugins:query_plugin")
    with caplog.at_level(logging.WARNING, logger="attn_dispatch"):
        ops = load_cpu(monkeypatch)
    reports = by_name(ops)
    assert reports["broken"].status == "failed"
    assert "import failed: ImportError: libfake_kernels.so" in reports["broken"].reason
    assert reports["test_query"].status == "active"  # the others still load
    assert sum("plugin broken failed" in r.getMessage() for r in caplog.records) == 1


def test_a_disabled_plugin_is_not_imported(monkeypatch):
    add_entry_points(monkeypatch, broken="fake_broken_plugin")
    report = by_name(load_cpu(monkeypatch, ATTN_DISPATCH_BROKEN="0"))["broken"]
    assert (report.status, report.reason) == ("disabled-by-env", "ATTN_DISPATCH_BROKEN=0")


def test_failure_is_logged_once_across_devices_and_again_after_refresh(monkeypatch, caplog):
    add_entry_points(monkeypatch, broken="fake_broken_plugin")
    with caplog.at_level(logging.WARNING, logger="attn_dispatch"):
        load_cpu(monkeypatch)
        attn_dispatch.load("cpu")  # another device, same failure: not logged again
    assert sum("plugin broken failed" in r.getMessage() for r in caplog.records) == 1
    with caplog.at_level(logging.WARNING, logger="attn_dispatch"):
        attn_dispatch.load(refresh=True)  # refresh resets the log-once set
    assert sum("plugin broken failed" in r.getMessage() for r in caplog.records) == 2


def test_plugin_that_raises_on_import_raises_in_strict_mode(monkeypatch):
    add_entry_points(monkeypatch, broken="fake_broken_plugin")
    with pytest.raises(attn_dispatch.PluginLoadError, match="broken failed: import failed"):
        load_cpu(monkeypatch, ATTN_DISPATCH_STRICT="1")


def test_requested_but_unavailable_is_an_error_only_in_strict_mode(monkeypatch):
    ops = load_cpu(monkeypatch, ATTN_DISPATCH_CUDA_FA3="1")
    assert by_name(ops)["cuda_fa3"].requested
    assert by_name(ops)["cuda_fa3"].status == "not-this-arch"
    with pytest.raises(attn_dispatch.PluginLoadError, match="cuda_fa3 was asked for but is not-this-arch"):
        load_cpu(monkeypatch, ATTN_DISPATCH_CUDA_FA3="1", ATTN_DISPATCH_STRICT="1")


@pytest.mark.parametrize(
    "entry, status, reason",
    [
        ("gpu_only_plugin", "not-this-arch", "targets sm90; this device is cpu"),
        ("missing_dep_plugin", "missing-dependency", "surely_not_an_installed_module_xyz not installed"),
        ("declining_plugin", "missing-dependency", "kernels not built for this card"),
        ("raising_plugin", "failed", "RuntimeError: bug in plugin"),
        ("half_group_plugin", "failed", "missing mla_query_for_backend"),
    ],
)
def test_statuses_and_reasons(monkeypatch, entry, status, reason):
    name = getattr(fake_plugins, entry).name
    add_entry_points(monkeypatch, **{name: f"fake_plugins:{entry}"})
    ops = load_cpu(monkeypatch)
    report = by_name(ops)[name]
    assert (report.status, report.ops) == (status, ())
    assert reason in report.reason
    assert all(res.plugin == "reference" for res in ops.resolutions.values())  # nothing half-registered kept


def test_entry_point_name_must_match_spec_name(monkeypatch):
    add_entry_points(monkeypatch, other_name="fake_plugins:query_plugin")
    assert "describes itself as 'test_query'" in by_name(load_cpu(monkeypatch))["other_name"].reason


def test_two_plugins_for_one_group_first_by_name_wins(monkeypatch, caplog):
    add_entry_points(monkeypatch, test_query="fake_plugins:query_plugin", test_query_two="fake_plugins:second_query_plugin")
    with caplog.at_level(logging.WARNING, logger="attn_dispatch"):
        ops = load_cpu(monkeypatch)
    assert ops.resolutions["mla_decode_query"].plugin == "test_query"
    assert by_name(ops)["test_query_two"].ops == ()
    assert any("already provided by test_query" in r.getMessage() for r in caplog.records)


def test_load_logs_one_info_summary(monkeypatch, caplog):
    with caplog.at_level(logging.INFO, logger="attn_dispatch"):
        load_cpu(monkeypatch)
    summaries = [r.getMessage() for r in caplog.records if r.getMessage().startswith("attn_dispatch on")]
    assert len(summaries) == 1
    assert "reference=9" in summaries[0] and "cuda_fa3:not-this-arch" in summaries[0]


def test_resolve_once_no_hook_call_per_op_call(monkeypatch):
    """Hooks run at load; calling a resolved op makes zero pluggy hook calls."""
    hook_calls = []
    make = plugins.make_plugin_manager

    def monitored():
        pm = make()
        pm.add_hookcall_monitoring(lambda name, impls, kwargs: hook_calls.append(name), lambda *a: None)
        return pm

    monkeypatch.setattr(plugins, "make_plugin_manager", monitored)
    add_entry_points(monkeypatch, test_query="fake_plugins:query_plugin")
    ops = load_cpu(monkeypatch)
    assert "attn_dispatch_register_ops" in hook_calls and "attn_dispatch_plugin_spec" in hook_calls
    at_load = len(hook_calls)

    q_nope, q_rope = torch.randn(2, 4, 512), torch.randn(2, 4, 64)
    for _ in range(10):
        q, rope = ops.mla_query_for_backend(q_nope, q_rope, is_decode=True, decode_impl="aiter")
        ops.mla_decode_query(q, rope, num_heads=4, kv_lora_rank=512, decode_impl="aiter")
        ops.mla_v_up_proj(torch.randn(2, 4, 16), torch.randn(4, 16, 8))
    assert len(hook_calls) == at_load


def test_ops_attributes_are_the_plain_functions(monkeypatch):
    ops = load_cpu(monkeypatch)
    for op in attn_dispatch.OP_NAMES:
        assert getattr(ops, op) is getattr(reference, op)
