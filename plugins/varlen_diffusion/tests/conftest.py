"""Test set-up for the varlen_diffusion plugin.

Without a GPU, Triton kernels run in the interpreter: TRITON_INTERPRET must be set before the plugin's
kernels module is imported (``triton.jit`` reads it at decoration time). The torch stand-in provider
lives beside this file and is imported by module name.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))

import attn_dispatch  # noqa: E402


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No attn_dispatch variables and no cached loads from outside the test."""
    for name in list(os.environ):
        if name.startswith("ATTN_DISPATCH_"):
            monkeypatch.delenv(name)
    attn_dispatch.reset()
    yield
    attn_dispatch.reset()
