"""Which FlashAttention provider to use: the registry, the probe orders, :func:`probe` and :func:`require`.

Nothing is imported until a probe runs (at plugin load), so importing this package is cheap.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from attn_dispatch import MissingDependency

from .fa3 import sgl_kernel, upstream_fa3, vllm_fa3
from .fa4 import fa4
from .provider import FlashProvider

log = logging.getLogger("attn_dispatch")

# FA3 probe order: sglang's kernel package, then vllm's, then upstream FA3 (which cannot write into `out`).
FA3_ORDER: tuple[str, ...] = ("sgl_kernel", "vllm_fa3", "flash_attn_interface")
# Blackwell: FA3's kernels are Hopper-only; flash-attn-4 is the provider there.
FA4_ORDER: tuple[str, ...] = ("fa4",)

# name -> factory; a factory imports its package and raises when it is missing or too old. Tests add
# stand-ins here (monkeypatch.setitem).
PROVIDERS: dict[str, Callable[[], FlashProvider]] = {
    "sgl_kernel": sgl_kernel,
    "vllm_fa3": vllm_fa3,
    "flash_attn_interface": upstream_fa3,
    "fa4": fa4,
}


def probe_order(arch: str) -> tuple[str, ...]:
    """The providers worth trying on ``arch`` (a ``Hardware.arch`` value such as ``"sm90"``)."""
    return FA4_ORDER if arch == "sm100" else FA3_ORDER


def require(arch: str, order: tuple[str, ...] | None = None) -> FlashProvider:
    """The first importable provider for ``arch`` (``order`` defaults to :func:`probe_order`), or
    :class:`attn_dispatch.MissingDependency` with what each candidate said: a plugin's decline."""
    provider, reason = probe(order or probe_order(arch))
    if provider is not None:
        return provider
    if arch == "sm100" and not order:
        raise MissingDependency(f"flash-attn-4 not installed (FA3's kernels are Hopper-only): {reason}")
    raise MissingDependency(f"install sglang-kernel>=0.4.10 or vllm: {reason}")


def probe(order: tuple[str, ...] | None = None) -> tuple[FlashProvider | None, str]:
    """The first provider that imports, and a reason listing what failed when none does.

    ``order`` defaults to :data:`FA3_ORDER`; an unknown name is reported as a failure, not raised.
    """
    failures = []
    for name in order or FA3_ORDER:
        factory = PROVIDERS.get(name)
        if factory is None:
            failures.append(f"{name}: unknown provider (known: {', '.join(PROVIDERS)})")
            continue
        try:
            provider = factory()
        except Exception as exc:  # ImportError, or a package present without its FA extension
            failures.append(f"{name}: {type(exc).__name__}: {exc}".splitlines()[0])
            continue
        log.debug("FlashAttention provider: %s", provider.describe())
        return provider, ""
    return None, "no FlashAttention provider importable (" + "; ".join(failures) + ")"
