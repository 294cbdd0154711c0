import os
import sys

import pytest

# The fake plugins below are loaded through real entry points, which import them by module name.
sys.path.insert(0, os.path.dirname(__file__))

import attn_dispatch  # noqa: E402


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """Every test starts with no attn_dispatch variables and no cached loads."""
    for name in list(os.environ):
        if name.startswith("ATTN_DISPATCH_"):
            monkeypatch.delenv(name)
    attn_dispatch.reset()
    yield
    attn_dispatch.reset()
