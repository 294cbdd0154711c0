"""Make this directory's helper modules (fa3_torch_provider, fa3_batches) importable under
--import-mode=importlib, start every test with fresh plugin counters (the root conftest cleans the
environment), and give the GPU tests the real FA3 provider (``provider``)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def fresh_fa3_stats():
    from attn_dispatch_cuda_fa3 import stats

    stats.reset()


@pytest.fixture(scope="module")
def provider():
    """The installed FA3 provider on an sm90 GPU; the test is skipped anywhere else."""
    import torch
    from attn_dispatch_flash import probe

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("FA3 needs an sm90 GPU")
    found, reason = probe()
    if found is None:
        pytest.skip(reason)
    return found
