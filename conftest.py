"""Shared by every test in the repo (host and plugins): each starts with no ``ATTN_DISPATCH_*`` variables
and no cached :func:`attn_dispatch.load`, so no test sees another's environment or plugin state."""

import os

import pytest

import attn_dispatch


@pytest.fixture(autouse=True)
def clean_attn_dispatch_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("ATTN_DISPATCH_"):
            monkeypatch.delenv(name)
    attn_dispatch.reset()
    yield
    attn_dispatch.reset()
