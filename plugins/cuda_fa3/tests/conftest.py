"""Make this directory's helper modules (fa3_torch_provider, fa3_batches) importable under
--import-mode=importlib, and start every test with fresh plugin counters and no attn_dispatch settings."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def fresh_fa3_state(monkeypatch):
    import attn_dispatch
    from attn_dispatch_cuda_fa3 import stats

    for name in list(os.environ):
        if name.startswith("ATTN_DISPATCH_"):
            monkeypatch.delenv(name)
    attn_dispatch.reset()
    stats.reset()
    yield
    attn_dispatch.reset()
