import json
import os
import subprocess
import sys

import pytest

from attn_dispatch import cli
from fault_dists import site  # noqa: F401  (fixture)

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
    assert "compared the reference with itself" in out  # says plainly what a CPU run proves


def run_cli(*args: str, env: dict[str, str], pythonpath: str = "") -> subprocess.CompletedProcess:
    """The real command in a fresh interpreter (logging configured as a user gets it, no pytest handlers)."""
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("ATTN_DISPATCH_")}
    if pythonpath:
        clean["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, clean.get("PYTHONPATH", "")]))
    command = [sys.executable, "-c", "import sys; from attn_dispatch.cli import main; sys.exit(main(sys.argv[1:]))", *args]
    return subprocess.run(command, env=clean | env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("level", ["bogus", "10", " info", "Warning"])
def test_log_level_never_crashes_the_cli(level):
    done = run_cli("info", env={"ATTN_DISPATCH_ARCH": "cpu", "ATTN_DISPATCH_LOG_LEVEL": level})
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    if level == "bogus":
        assert done.stderr.count("ATTN_DISPATCH_LOG_LEVEL='bogus' is unreadable") == 1
    if level in ("10", " info"):
        assert "INFO attn_dispatch: attn_dispatch on cpu" in done.stderr


def test_strict_error_is_printed_once(site):
    site.plugin("fault_raise", register="raise RuntimeError('boom')")
    done = run_cli("info", env={"ATTN_DISPATCH_ARCH": "cpu", "ATTN_DISPATCH_STRICT": "1"}, pythonpath=str(site.root))
    assert done.returncode == 2
    assert done.stderr.count("boom") == 1 and " and: " not in done.stderr, done.stderr


def test_info_text_reads_plainly(monkeypatch, capsys):
    monkeypatch.setenv("ATTN_DISPATCH_ROCM_NSA", "0")
    assert cli.main(["info", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("hardware: cpu\n")  # not "cpu (cpu, cpu)"
    line = next(line for line in text.splitlines() if line.startswith("  rocm_nsa"))
    assert "archs=-" in line and "archs=?" not in text
