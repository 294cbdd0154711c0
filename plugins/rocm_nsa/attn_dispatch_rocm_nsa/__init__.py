"""NSA/DSA decode on gfx950 (tilelang or aiter decode impl): the backend takes the caller's already
concatenated query as a zero-copy view instead of concatenating again. Seed: sglang NSA cat-skip.

Public API: :func:`mla_query_for_backend` and :func:`mla_decode_query` (the two sides of the hand-off),
:data:`CAT_SKIPPING_DECODE_IMPLS` and :func:`build_ops` (what gets registered).

The cat-skip itself is pure torch (views and an in-place scale). The plugin still requires aiter, as
the issue's detection contract says: the HIP decode impls it serves (tilelang, aiter) ship with it in
every ROCm serving image, and "aiter not installed" is the signal that this is not such an image.
"""

from __future__ import annotations

from collections.abc import Callable

from attn_dispatch import Hardware, PluginSpec, hookimpl

from .decode_query import CAT_SKIPPING_DECODE_IMPLS, mla_decode_query, mla_query_for_backend

NAME = "rocm_nsa"
ARCHS = ("gfx950",)

__all__ = ["ARCHS", "CAT_SKIPPING_DECODE_IMPLS", "NAME", "build_ops", "mla_decode_query", "mla_query_for_backend"]


def build_ops() -> dict[str, Callable]:
    """The ops this plugin registers: the whole ``mla_decode_query`` group."""
    return {"mla_query_for_backend": mla_query_for_backend, "mla_decode_query": mla_decode_query}


@hookimpl
def attn_dispatch_plugin_spec(hardware: Hardware) -> PluginSpec:
    return PluginSpec(name=NAME, archs=ARCHS, requires=("torch", "aiter"), description=__doc__.splitlines()[0])


@hookimpl
def attn_dispatch_register_ops(hardware: Hardware, register) -> None:
    impls = ", ".join(sorted(CAT_SKIPPING_DECODE_IMPLS))
    for op, implementation in build_ops().items():
        register(op, implementation, note=f"cat-skip for decode_impl in {{{impls}}}")
