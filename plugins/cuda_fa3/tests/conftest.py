"""Make this directory's helper modules (fa3_torch_provider, fa3_batches) importable under
--import-mode=importlib, and start every test with fresh plugin counters (the root conftest cleans the
environment)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def fresh_fa3_stats():
    from attn_dispatch_cuda_fa3 import stats

    stats.reset()
