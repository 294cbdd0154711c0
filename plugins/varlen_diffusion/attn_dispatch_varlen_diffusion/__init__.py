"""Masked (key-padding) diffusion attention as varlen FlashAttention with fused Triton pack/scatter
kernels, instead of SDPA's slow masked path. Seed PR: sglang #26318.

Registers the ``masked_attention`` op group (``build_mask_meta``, ``masked_attention``) on sm90 (FA3
through :mod:`attn_dispatch_flash`, the internal distribution ``plugins/flash``) and sm100 (FA4 through
the same layer, when installed). Self- and cross-attention (``S_q != S_k``), GQA included.
Strategies, the row-by-row contract and the fallbacks: :mod:`attn_dispatch_varlen_diffusion.attention`.
Setting: ``ATTN_DISPATCH_VARLEN_DIFFUSION_STRATEGY=kv_pack|qkv_pack`` (general masks; default kv_pack).
Tests and benchmarks inject a provider with ``attention.build_ops(provider)``.

This module imports nothing heavy: Triton and the provider load in ``attn_dispatch_register_ops``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from attn_dispatch import Hardware, MissingDependency, PluginSpec, Setting, hookimpl

if TYPE_CHECKING:
    from attn_dispatch_flash import FlashProvider

NAME = "varlen_diffusion"
ARCHS = ("sm90", "sm100")
MIN_FA_VERSION = {"sm90": 3, "sm100": 4}  # FA3's kernels are Hopper-only; Blackwell needs FA4
STRATEGY = Setting(
    "strategy", default="kv_pack", choices=("kv_pack", "qkv_pack"), help="strategy for general masks (qkv_pack drops masked query rows)"
)


@hookimpl
def attn_dispatch_plugin_spec(hardware: Hardware) -> PluginSpec:
    return PluginSpec(
        name=NAME, archs=ARCHS, requires=("torch", "triton"), description=__doc__.splitlines()[0], settings=(STRATEGY,)
    )


@hookimpl
def attn_dispatch_register_ops(hardware: Hardware, register, settings: Mapping[str, object]) -> None:
    """Resolve the provider once, then offer both ops of the group bound to it."""
    from .attention import build_ops

    provider = probe_provider(hardware.arch)
    ops = build_ops(provider, general_strategy=settings["strategy"])
    register("build_mask_meta", ops.build_mask_meta, note=ops.describe())
    register("masked_attention", ops.masked_attention, note=ops.describe())


def probe_provider(arch: str) -> FlashProvider:
    """The shared layer's first importable provider for ``arch`` (FA3 order on sm90, FA4 on sm100)."""
    from attn_dispatch_flash import require

    provider = require(arch)
    if provider.fa_version < MIN_FA_VERSION[arch]:  # guard: the probe order is the shared layer's choice
        raise MissingDependency(f"{arch} needs FA{MIN_FA_VERSION[arch]}; found {provider.describe()}")
    return provider
