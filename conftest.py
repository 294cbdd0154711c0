"""Shared by every test in the repo (host and plugins).

Without a GPU, Triton kernels must run in the interpreter: ``triton.jit`` reads ``TRITON_INTERPRET`` when
a kernel is decorated, at import. This file is loaded before any test module is collected, so it sets
``TRITON_INTERPRET=1`` here, before anything imports triton; a plain ``pytest`` from the repository root
then passes whichever module is collected first. A value already in the environment is kept.

Under tox (``TEST_ATTN_DISPATCH_INSTALLED=1``) the suite must test the installed wheels: if attn_dispatch
comes from this checkout instead, the run stops here (``tests/test_packaging.py`` checks every package).

Each test starts with no ``ATTN_DISPATCH_*`` variables and no cached :func:`attn_dispatch.load`, so no
test sees another's environment or plugin state.
"""

import os
from pathlib import Path

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import attn_dispatch  # noqa: E402  (imported after TRITON_INTERPRET is settled)

if os.environ.get("TEST_ATTN_DISPATCH_INSTALLED") == "1":
    _origin = Path(attn_dispatch.__file__).resolve()
    if _origin.parent == Path(__file__).resolve().parent / "attn_dispatch":
        pytest.exit(f"TEST_ATTN_DISPATCH_INSTALLED=1 but attn_dispatch comes from the checkout: {_origin}", 4)


@pytest.fixture(autouse=True)
def clean_attn_dispatch_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("ATTN_DISPATCH_"):
            monkeypatch.delenv(name)
    attn_dispatch.reset()
    yield
    attn_dispatch.reset()
