"""FlashAttention configurations whose answers the conformance suite (``tests/test_conformance.py``) found
wrong on a provider build, looked up when a layer's call is bound (never per call).

Today this warns; it does not yet reroute (issue 12). The one class found on the H200 with vllm 0.33.0's
FA3 (``vllm_fa3``): head dim > 192, MHA with >= 4 heads, a local window, several sequences: max error
0.26-0.52 against about 0.01 for a bf16 reference, the same bytes through vllm's own Python API. Only the
window (255, 0) was seen wrong ((127, 0), (511, 0), (1023, 0), (255, 255) were right), so every local
window of that shape class is reported as suspect.
"""

from __future__ import annotations

import logging

from attn_dispatch.plans import AttentionParams

from .stats import stats

log = logging.getLogger("attn_dispatch")

SUSPECT_PROVIDERS = ("vllm_fa3",)  # builds the class was seen on; others are unverified, not known wrong
_warned: set[tuple[str, str]] = set()


def known_wrong(provider: str, head_dim: int, heads: int, kv_heads: int, params: AttentionParams) -> str | None:
    """Why FlashAttention from ``provider`` may answer this layer wrongly, or None."""
    if provider not in SUSPECT_PROVIDERS or params.window_size == (-1, -1):
        return None
    if head_dim > 192 and heads == kv_heads and heads >= 4:
        return (
            f"known-wrong: {provider} with head_dim {head_dim} > 192, {heads} heads without GQA and local window "
            f"{params.window_size} (the conformance suite found errors up to 0.5 on the H200 for window (255, 0)); "
            "not yet rerouted: set ATTN_DISPATCH_CUDA_FA3=0 for this model"
        )
    return None


def warn_if_known_wrong(provider: str, head_dim: int, heads: int, kv_heads: int, params: AttentionParams) -> None:
    """Log ``known_wrong``'s reason once per process and count it (``stats.known_wrong_bindings``)."""
    reason = known_wrong(provider, head_dim, heads, kv_heads, params)
    if reason is None:
        return
    stats.known_wrong_bindings += 1
    if (provider, reason) not in _warned:
        _warned.add((provider, reason))
        log.warning("cuda_fa3: %s", reason)
