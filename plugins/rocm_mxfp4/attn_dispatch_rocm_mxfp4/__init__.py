"""MLA value up-projection on gfx950: aiter's w_vc batched GEMM writes through a transposed view of a
(batch, heads, v_dim) buffer, so the flatten into o_proj is a free view. Seed PR: sglang #25463.

Public API: :class:`Kernels` (the kernel-provider seam), :func:`aiter_kernels` (builds it from aiter),
:func:`make_v_up_proj` (the op, original or strided path) and :func:`build_ops` (what gets registered).
"""

from __future__ import annotations

from collections.abc import Callable

from attn_dispatch import Hardware, PluginSpec, hookimpl

from .kernels import Kernels, aiter_kernels
from .v_up_proj import make_v_up_proj

NAME = "rocm_mxfp4"
ARCHS = ("gfx950",)

__all__ = ["ARCHS", "NAME", "Kernels", "aiter_kernels", "build_ops", "make_v_up_proj"]


def build_ops(kernels: Kernels) -> dict[str, Callable]:
    """The ops this plugin registers (group ``mla_v_up_proj``), built over ``kernels``."""
    return {"mla_v_up_proj": make_v_up_proj(kernels, strided_output=True)}


@hookimpl
def attn_dispatch_plugin_spec(hardware: Hardware) -> PluginSpec:
    return PluginSpec(name=NAME, archs=ARCHS, requires=("torch",), description=__doc__.splitlines()[0])


@hookimpl
def attn_dispatch_register_ops(hardware: Hardware, register) -> None:
    kernels = aiter_kernels()  # raises MissingDependency("aiter not installed") without aiter
    for op, implementation in build_ops(kernels).items():
        register(op, implementation, note=kernels.provider)
