"""Op specs: one signature and one set of argument rules per op (placeholder, being written)."""

from __future__ import annotations

from collections.abc import Callable


def signature_problem(op: str, implementation: Callable) -> str | None:
    """Why ``implementation`` cannot serve ``op`` (its signature differs from the spec), or None."""
    return None
