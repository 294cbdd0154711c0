"""CPU: the provider layer's record, probe and packaging contract (a library, not a plugin)."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest
from attn_dispatch import MissingDependency

import attn_dispatch_flash as flash
from attn_dispatch_flash import FlashArgs


def test_flash_args_needs_the_four_scalars_and_has_fa3_defaults():
    with pytest.raises(TypeError):
        FlashArgs(max_seqlen_q=1, max_seqlen_k=1, softmax_scale=0.5)  # causal missing
    args = FlashArgs(max_seqlen_q=1, max_seqlen_k=8, softmax_scale=0.5, causal=True)
    assert args.window_size == (-1, -1) and args.softcap == 0.0 and args.num_splits == 0
    assert args.pack_gqa is None and args.scheduler_metadata is None and args.page_table is None
    assert args._replace(causal=False).causal is False and args.causal is True  # immutable: copies


def test_require_is_a_missing_dependency_naming_every_candidate(monkeypatch):
    def absent(name):
        def factory():
            raise ImportError(f"No module named {name!r}")

        return factory

    for name in flash.PROVIDERS:
        monkeypatch.setitem(flash.PROVIDERS, name, absent(name))
    with pytest.raises(MissingDependency, match=r"^install sglang-kernel>=0.4.10 or vllm: .*sgl_kernel: ImportError.*vllm_fa3: ImportError.*flash_attn_interface"):
        flash.require("sm90")
    with pytest.raises(MissingDependency, match=r"^flash-attn-4 not installed .*fa4: ImportError"):
        flash.require("sm100")
    provider, reason = flash.probe(("nonesuch",))
    assert provider is None and "nonesuch: unknown provider" in reason


def test_import_loads_no_provider_package():
    """Plugins import the layer at load; only a probe may import sgl_kernel, vllm or flash-attn."""
    code = "import sys, attn_dispatch_flash; print(sorted(m for m in ('sgl_kernel', 'vllm', 'flash_attn', 'flash_attn_interface') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_it_is_not_a_plugin():
    """No entry point of the attn_dispatch group points at this package: the host never loads it itself."""
    for ep in importlib.metadata.entry_points(group="attn_dispatch"):
        assert not ep.value.startswith("attn_dispatch_flash"), ep
