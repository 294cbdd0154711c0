"""MLA value up-projection on gfx950: aiter's w_vc batched GEMM writes through a transposed view of a
(batch, heads, v_dim) buffer, so the flatten into o_proj is a free view. Seed PR: sglang #25463.
"""

from __future__ import annotations

from attn_dispatch import Hardware, PluginSpec, hookimpl

NAME = "rocm_mxfp4"
ARCHS = ("gfx950",)


@hookimpl
def attn_dispatch_plugin_spec(hardware: Hardware) -> PluginSpec:
    return PluginSpec(name=NAME, archs=ARCHS, requires=("torch",), description=__doc__.splitlines()[0])


@hookimpl
def attn_dispatch_register_ops(hardware: Hardware, register) -> None:
    """Skeleton: the optimization lands in its own issue."""
