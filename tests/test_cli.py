import json

from attn_dispatch import cli

REAL_PLUGINS = {"cuda_fa3", "rocm_mxfp4", "rocm_nsa", "varlen_diffusion"}


def test_info_json_lists_every_plugin_with_status_and_reason(monkeypatch, capsys):
    monkeypatch.setenv("ATTN_DISPATCH_ARCH", "cpu")
    monkeypatch.setenv("ATTN_DISPATCH_ROCM_NSA", "0")
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["hardware"]["arch"] == "cpu"
    plugins = {p["name"]: p for p in info["plugins"]}
    assert REAL_PLUGINS <= set(plugins)
    assert plugins["rocm_nsa"]["status"] == "disabled-by-env"
    assert plugins["rocm_nsa"]["reason"] == "ATTN_DISPATCH_ROCM_NSA=0"
    assert plugins["cuda_fa3"]["status"] == "not-this-arch" and plugins["cuda_fa3"]["reason"]
    assert info["ops"]["paged_attention_out"]["plugin"] == "reference"
    assert info["env"] == {"ATTN_DISPATCH_ARCH": "cpu", "ATTN_DISPATCH_ROCM_NSA": "0"}


def test_info_text(monkeypatch, capsys):
    monkeypatch.setenv("ATTN_DISPATCH_ARCH", "cpu")
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    assert "hardware: cpu" in text and "not-this-arch" in text and "masked_attention" in text


def test_info_reports_a_bad_override_instead_of_a_traceback(monkeypatch, capsys):
    monkeypatch.setenv("ATTN_DISPATCH_ARCH", "sm999")
    assert cli.main(["info"]) == 2
    assert "known:" in capsys.readouterr().err


def test_selfcheck_on_cpu_runs_every_op_against_the_reference(monkeypatch, capsys):
    monkeypatch.setenv("ATTN_DISPATCH_ARCH", "cpu")
    assert cli.main(["selfcheck"]) == 0
    out = capsys.readouterr().out
    for op in ("paged_attention_out", "varlen_attention_out", "mla_v_up_proj", "mla_decode_query", "masked_attention"):
        assert op in out
    assert "reference (no plugin here)" in out and "FAIL" not in out
