"""FlashAttention-3 on sm90 (FA4 on sm100): attention writes into the engine's preallocated output
(no device-to-device copy per layer) and the scheduler metadata is made once per batch, not per layer.
Seed PRs: sglang #21985 (out-aliasing) and #21104 (metadata precompute).
"""

from __future__ import annotations

from attn_dispatch import Hardware, PluginSpec, hookimpl

NAME = "cuda_fa3"
ARCHS = ("sm90", "sm100")


@hookimpl
def attn_dispatch_plugin_spec(hardware: Hardware) -> PluginSpec:
    return PluginSpec(name=NAME, archs=ARCHS, requires=("torch",), description=__doc__.splitlines()[0])


@hookimpl
def attn_dispatch_register_ops(hardware: Hardware, register) -> None:
    """Skeleton: the optimization lands in its own issue."""
