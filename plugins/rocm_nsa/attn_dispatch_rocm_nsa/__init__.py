"""NSA/DSA decode on gfx950 (tilelang or aiter decode impl): the backend takes the caller's already
concatenated query as a zero-copy view instead of concatenating again. Seed: sglang NSA cat-skip.
"""

from __future__ import annotations

from attn_dispatch import Hardware, PluginSpec, hookimpl

NAME = "rocm_nsa"
ARCHS = ("gfx950",)


@hookimpl
def attn_dispatch_plugin_spec(hardware: Hardware) -> PluginSpec:
    return PluginSpec(name=NAME, archs=ARCHS, requires=("torch",), description=__doc__.splitlines()[0])


@hookimpl
def attn_dispatch_register_ops(hardware: Hardware, register) -> None:
    """Skeleton: the optimization lands in its own issue."""
