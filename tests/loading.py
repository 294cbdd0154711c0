"""Helpers shared by the host's loading tests (test_plugins, test_faults)."""

import attn_dispatch


def by_name(ops):
    """Each plugin's report, by plugin name."""
    return {report.name: report for report in ops.plugins}


def load_cpu(monkeypatch, **env):
    """A fresh load simulating the CPU arch, with ``env`` set for the test."""
    monkeypatch.setenv("ATTN_DISPATCH_ARCH", "cpu")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return attn_dispatch.load(refresh=True)
