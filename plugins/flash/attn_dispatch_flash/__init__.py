"""FlashAttention providers behind one small interface, shared by the plugins that run FA3/FA4
(``cuda_fa3``, ``varlen_diffusion``). An internal library, not a plugin: it has no entry point.

    from attn_dispatch_flash import FlashArgs, require

    provider = require("sm90")                     # at plugin load; MissingDependency when none imports
    call = provider.bind(FlashArgs(max_seqlen_q=..., max_seqlen_k=..., softmax_scale=..., causal=True,
                                   cu_seqlens_q=..., cu_seqlens_k=...))
    call(q, k, v, out)                             # per layer: the tensors only

Modules: :mod:`.args` (:class:`FlashArgs`, the forward's arguments as one record), :mod:`.provider`
(:class:`FlashProvider`), :mod:`.fa3` and :mod:`.fa4` (one adapter per package: sgl_kernel, vllm's FA3,
upstream FA3; flash-attn-4), :mod:`.probe` (registry, probe orders, :func:`probe`, :func:`require`),
:mod:`.rows` (fused Triton kernels that gather the valid rows of padded ``[B, S, H, D]`` tensors and
scatter packed rows back), :mod:`.rows_launch` (those kernels bound once per shape) and :mod:`.pages`
(a decode step's one-row page table from a padding mask, one bound launch).
FA3 probe order: ``sgl_kernel`` (sglang-kernel >= 0.4.10), ``vllm_fa3``, ``flash_attn_interface`` (cannot
write into ``out``); on sm100 ``fa4`` (``out=``, no scheduler metadata).

The ``rows`` modules and ``pages`` import Triton (extra ``attn-dispatch-flash[rows]``), so this ``__init__``
does not import them: only their users (varlen_diffusion, ``attn_dispatch.integrations.unpad`` and
``transformers_decode``) pay for it.
"""

from .args import FlashArgs
from .fa3 import raw_fa3_ops_provider
from .probe import FA3_ORDER, FA4_ORDER, PROVIDERS, probe, probe_order, require
from .provider import BoundCall, FlashProvider

__all__ = [
    "FA3_ORDER",
    "FA4_ORDER",
    "PROVIDERS",
    "BoundCall",
    "FlashArgs",
    "FlashProvider",
    "probe",
    "probe_order",
    "raw_fa3_ops_provider",
    "require",
]
