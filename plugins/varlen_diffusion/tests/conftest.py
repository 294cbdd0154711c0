"""Test set-up for the varlen_diffusion plugin.

Without a GPU, Triton kernels run in the interpreter: TRITON_INTERPRET must be set before the row movers'
module (``attn_dispatch_flash.rows``) is imported (``triton.jit`` reads it at decoration time). The torch stand-in provider
lives beside this file and is imported by module name. The root conftest cleans the environment.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))
