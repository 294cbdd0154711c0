"""Op specs: each op's contract stated once, as pytest states a hook once in its hookspec.

A spec is the op's signature (the reference function's: parameter names, positional or keyword-only,
defaults), its argument rules (the one validator in :mod:`attn_dispatch.validate` that the reference and
every plugin call), and what the rules cannot check on the host (values behind a device sync). The
semantics are the reference function's docstring and code.

``register()`` calls :func:`signature_problem` for each implementation a plugin offers, so a plugin whose
function would be called differently from the reference is refused at load time, not at the first call.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .ops import GROUP_OF, OP_NAMES, REFERENCE
from .validate import VALIDATORS


@dataclass(frozen=True)
class OpSpec:
    name: str
    group: str
    signature: inspect.Signature  # the reference's; implementations must match it (see signature_problem)
    validator: Callable  # attn_dispatch.validate.validate_<name>: every implementation calls it first
    reference: Callable  # the original path: the op's meaning
    host_unchecked: tuple[str, ...] = ()  # rules the validator cannot check without a device sync

    def describe(self) -> str:
        return f"{self.name}{_plain(self.signature)}"


# Rules that depend on tensor values. Checking them would sync with the device in every layer (and break
# CUDA-graph capture), so no implementation checks them; breaking them is undefined behaviour.
_HOST_UNCHECKED: Mapping[str, tuple[str, ...]] = {
    "make_attention_plan": (
        "every cache_seqlens entry <= max_seqlen_k (checkable only against page capacity on the host)",
        "cu_seqlens_q starts at 0, never decreases, and no step exceeds max_seqlen_q",
        "page_table entries used by a sequence are valid page indices of the caches",
        "a padded plan's 0 <= key_starts[b] <= cache_seqlens[b] <= max_seqlen_k for every row b",
    ),
    "paged_attention_out": (
        "q has at least cu_seqlens_q[-1] rows",
        "page_table entries < k_cache.shape[0]",
    ),
    "varlen_attention_out": (
        "cu_seqlens_q / cu_seqlens_k start at 0 and never decrease",
        "cu_seqlens_q[-1] <= q rows and cu_seqlens_k[-1] <= k rows",
        "per-sequence lengths <= max_seqlen_q / max_seqlen_k",
    ),
    "bind_attention": (
        "the run's calls: paged_attention_out's rules (paged plan) or varlen_attention_out's (packed plan)",
        "a packed plan's cu_seqlens_k: varlen_attention_out's rules, against k's rows",
        "a padded plan's run reads k[b, key_starts[b]:cache_seqlens[b]]: 0 <= start <= end <= k.shape[1] (max_seqlen_k)",
    ),
}

SPECS: Mapping[str, OpSpec] = {
    name: OpSpec(
        name=name,
        group=GROUP_OF[name],
        signature=inspect.signature(REFERENCE[name]),
        validator=VALIDATORS[name],
        reference=REFERENCE[name],
        host_unchecked=_HOST_UNCHECKED.get(name, ()),
    )
    for name in OP_NAMES
}

_KIND_TEXT = {
    inspect.Parameter.POSITIONAL_ONLY: "positional-only",
    inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional-or-keyword",
    inspect.Parameter.VAR_POSITIONAL: "*args",
    inspect.Parameter.KEYWORD_ONLY: "keyword-only",
    inspect.Parameter.VAR_KEYWORD: "**kwargs",
}


def signature_problem(op: str, implementation: Callable) -> str | None:
    """Why ``implementation`` cannot serve ``op`` (its signature differs from the spec), or None.

    Matches when it has the spec's parameters, no more and no fewer: the same names, the positional ones in
    the same order, each positional-or-keyword or keyword-only as in the spec, and the spec's default
    wherever the spec has one (a default where the spec has none is allowed: callers always pass it).
    ``*args``/``**kwargs`` are refused: they would hide a mismatch until the first call. Annotations are
    not compared. Bound methods and ``functools.wraps`` wrappers are read as they are called.
    """
    spec = SPECS.get(op)
    if spec is None:
        return f"unknown op {op!r}; known ops: {', '.join(OP_NAMES)}"
    try:
        got = inspect.signature(implementation)
    except (TypeError, ValueError) as exc:
        return f"{op}: cannot read the implementation's signature ({exc})"
    reason = _difference(spec.signature.parameters, got.parameters)
    return None if reason is None else f"{op}: {reason}; the spec is {spec.describe()}"


def _difference(want: Mapping[str, inspect.Parameter], have: Mapping[str, inspect.Parameter]) -> str | None:
    variadic = [p for p in have.values() if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if variadic:
        return f"takes {_KIND_TEXT[variadic[0].kind]} ({variadic[0].name}); spell out the spec's parameters"
    missing = [name for name in want if name not in have]
    extra = [name for name in have if name not in want]
    if missing or extra:
        return "; ".join(([f"missing {', '.join(missing)}"] if missing else []) + ([f"unexpected {', '.join(extra)}"] if extra else []))
    for name, w in want.items():
        g = have[name]
        if g.kind != w.kind:
            return f"{name} is {_KIND_TEXT[g.kind]}, the spec's is {_KIND_TEXT[w.kind]}"
        if w.default is not inspect.Parameter.empty:
            if g.default is inspect.Parameter.empty:
                return f"{name} has no default, the spec's is {w.default!r}"
            if not _same_default(g.default, w.default):
                return f"{name} defaults to {g.default!r}, the spec's to {w.default!r}"
    positional = [n for n, p in have.items() if p.kind is not p.KEYWORD_ONLY]
    spec_positional = [n for n, p in want.items() if p.kind is not p.KEYWORD_ONLY]
    if positional != spec_positional:
        return f"positional parameters in order {', '.join(positional)}, the spec's {', '.join(spec_positional)}"
    return None


def _same_default(a: object, b: object) -> bool:
    if a is b:
        return True
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # a default whose == is not a plain bool (a tensor): only identity counts
        return False


def _plain(signature: inspect.Signature) -> str:
    """``(q, k, *, plan, params=...)``: the signature without annotations, for one-line messages."""
    params = [p.replace(annotation=inspect.Parameter.empty) for p in signature.parameters.values()]
    return str(signature.replace(parameters=params, return_annotation=inspect.Signature.empty))
