"""Plugins' torch operators for torch.compile, registered without ``torch.library.custom_op``'s wrapper.

A plugin's compiled path is one torch op per layer (its eager path skips the op and calls the bound
kernel directly). ``torch.library.custom_op`` wraps the function in Python layers that run on every call,
compiled or not: an autograd kernel that redispatches, and an aliasing check of the outputs against the
inputs. On the development CPU that costs 11 us per call against 2.7 us for the same function registered
directly (a no-op body), and compiled diffusion models make one such call per attention block on a host
that is already the bottleneck. So, as vLLM's ``direct_register_custom_op`` does, :func:`register` defines
the op from the function's annotations (``torch.library.infer_schema``), implements it once for every
backend (``CompositeExplicitAutograd``), and registers the fake (meta) implementation Dynamo and Inductor
trace with. What the wrapper added and these ops do without: no autograd formula (backward through them
raises, as it does through a custom op without one: the plugins' fast paths are for inference), and no
runtime aliasing check (each op's contract states what it returns; the tests check it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

_libraries: dict[str, torch.library.Library] = {}  # kept alive: a dropped Library unregisters its ops


def register(
    qualname: str, fn: Callable, *, fake: Callable, mutates_args: Iterable[str] = (), cudagraph_unsafe: bool = False
) -> torch._ops.OpOverload:
    """Define ``qualname`` (``"namespace::name"``) with ``fn``'s annotated signature, implemented by ``fn``
    for every backend, traced through ``fake``; returns the op overload to call. ``mutates_args``: the
    names of the tensor arguments ``fn`` writes (annotated ``Tensor(a1!)`` in the schema, so
    functionalization and Inductor's re-inplacing see the write). ``cudagraph_unsafe``: tag the op so that
    Inductor's CUDA graphs (``mode="reduce-overhead"``) leave it out: with graph partitioning it runs
    eagerly between captured partitions, else the graph is not captured (torch without the tag: no tag)."""
    namespace, name = qualname.split("::")
    library = _libraries.get(namespace)
    if library is None:
        library = _libraries[namespace] = torch.library.Library(namespace, "FRAGMENT")
    schema = torch.library.infer_schema(fn, mutates_args=tuple(mutates_args))
    tag = getattr(torch.Tag, "cudagraph_unsafe", None) if cudagraph_unsafe else None
    library.define(name + schema, tags=() if tag is None else (tag,))
    library.impl(name, fn, "CompositeExplicitAutograd")
    torch.library.register_fake(qualname, fake, lib=library)
    return getattr(getattr(torch.ops, namespace), name).default
