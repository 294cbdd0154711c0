"""Set-up for the integration tests: without diffusers (transformers) their tests are not collected; Triton kernels run in
the interpreter on a CPU-only machine (set before the plugin's kernels are imported), and the
varlen_diffusion plugin's CPU stand-in provider is importable by module name."""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "..", "plugins", "varlen_diffusion", "tests"))
sys.path.insert(0, os.path.join(HERE, "..", "..", "plugins", "cuda_fa3", "tests"))  # fa3_torch_provider
collect_ignore_glob = []

try:
    import diffusers  # noqa: F401
except ImportError:  # the optional extra is not installed: these tests are not collected
    collect_ignore_glob.append("test_diffusers_*.py")

try:
    import transformers  # noqa: F401
except ImportError:
    collect_ignore_glob.append("test_transformers_*.py")
