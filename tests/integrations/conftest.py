"""Set-up for the integration tests: diffusers must be importable (else they skip), Triton kernels run in
the interpreter on a CPU-only machine (set before the plugin's kernels are imported), and the
varlen_diffusion plugin's CPU stand-in provider is importable by module name."""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "..", "plugins", "varlen_diffusion", "tests"))

pytest.importorskip("diffusers")
