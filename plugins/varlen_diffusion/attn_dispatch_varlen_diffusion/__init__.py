"""Masked (key-padding) diffusion attention as varlen FlashAttention with fused Triton pack/scatter
kernels, instead of SDPA's slow masked path. Seed PR: sglang #26318.
"""

from __future__ import annotations

from attn_dispatch import Hardware, PluginSpec, hookimpl

NAME = "varlen_diffusion"
ARCHS = ("sm90", "sm100")


@hookimpl
def attn_dispatch_plugin_spec(hardware: Hardware) -> PluginSpec:
    return PluginSpec(name=NAME, archs=ARCHS, requires=("torch",), description=__doc__.splitlines()[0])


@hookimpl
def attn_dispatch_register_ops(hardware: Hardware, register) -> None:
    """Skeleton: the optimization lands in its own issue."""
