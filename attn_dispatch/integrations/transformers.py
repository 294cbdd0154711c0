"""An ``attn_dispatch`` attention implementation for transformers (supported: transformers 5.17.x).

Importing this module registers ``"attn_dispatch"`` in transformers' ``AttentionInterface`` and, under
the same name, a mask function in ``AttentionMaskInterface``, so a stock model takes it with
``from_config(cfg, attn_implementation="attn_dispatch")``, ``from_pretrained(...,
attn_implementation="attn_dispatch")`` or ``model.set_attn_implementation("attn_dispatch")``, and its
attention always gets the padding mask (a custom attention without a mask function gets None).

The mask function is ``sdpa``'s own (``masking_utils.sdpa_mask``, same arguments, same tensor): the
fallback below must hand ``sdpa`` exactly what it would have got. FlashAttention's 2D mask form would
not do for that, and the 4D mask alone does not say where the queries sit, so the mask function also
records, next to the tensor it returns, the 2D padding mask and offsets it was made from
(``transformers_meta``). The first layer turns that record into the forward's metadata and a plan with
its bound per-layer call (``make_attention_plan`` + ``bind_attention``: FA3's scheduler metadata made
once); every other layer of the forward reuses them (transformers' own FlashAttention path unpads, with a
sync, in every layer, and FA3 schedules itself in every call):

- a decode step (one query per row) works out each row's visible keys on the device, with no host sync
  (``transformers_decode``), and FA3 reads transformers' caches in place as one-row pages: exact for any
  mask row, holes and sliding windows included;
- a prefill is decided on the host (one sync): a left-padded batch gets a padded plan, FA3 reading each
  row's keys in place from transformers' own q/k/v into the ``[B, Q, H, D]`` output (no pack, no
  scatter); other batches it computes exactly (right padding) get a packed plan with the row movers.

What runs where (per layer call):

- the fast path, FlashAttention (``attn_dispatch.load(device)``; cuda_fa3 on sm90), with
  bottom-right-aligned causal attention (FA3's), ``window_size=(sliding_window - 1, 0)`` and
  ``softcap``: q/k/v fp16/bf16 of one dtype and device, a head dim that is a multiple of 8 and at most
  256 (v's the same), query heads a multiple of key heads (GQA), no dropout, no ``output_attentions``, a
  causal module, no position bias, no autograd, not being compiled, and a mask that is None (no padding)
  or one this module's mask function made from a plain causal or sliding-window causal pattern: any such
  mask in a decode step (one query per row; a cache laid out ``[B, H_kv, K, D]``, as transformers' Dynamic
  and Static caches are), and in a prefill one whose valid tokens are one run per row (left or right padding).
  Output rows of padding queries are zeros (``sdpa`` computes something there; no valid token reads it).
  ``softcap`` is applied (``sdpa`` ignores it; eager applies it).
- transformers' ``sdpa`` attention function, called with exactly the arguments it would have got (so
  byte-identical): everything else, including devices where the attention ops resolved to the
  reference (unless an op group was injected with :func:`use_ops`).

Any transformers version other than 5.17.x makes the import raise :class:`UnsupportedTransformersVersion`:
the mask record depends on ``masking_utils`` internals of that version.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import torch

from . import transformers_build as build
from . import transformers_decode as decode
from . import transformers_meta as meta
from . import transformers_paged
from .common import OpGroups, check_series, log

try:
    import transformers
    from transformers import masking_utils
    from transformers.integrations import sdpa_attention
    from transformers.modeling_utils import AttentionInterface
except ImportError as exc:  # pragma: no cover - the extra is not installed
    raise ImportError(
        "attn_dispatch.integrations.transformers needs transformers 5.17.x: pip install 'transformers==5.17.*'"
        " (or, in an attn_dispatch checkout, pip install '.[transformers]')"
    ) from exc

NAME = "attn_dispatch"
SUPPORTED_TRANSFORMERS = ("5.17",)  # major.minor series this module was written and tested against
MAX_HEAD_DIM = 256


class UnsupportedTransformersVersion(RuntimeError):
    """The installed transformers is not one this integration supports (see ``SUPPORTED_TRANSFORMERS``)."""


def check_transformers_version(version: str | None = None) -> None:
    """Raise :class:`UnsupportedTransformersVersion` unless ``version`` (default: installed) is supported."""
    version = transformers.__version__ if version is None else version
    check_series("transformers", version, SUPPORTED_TRANSFORMERS, UnsupportedTransformersVersion, "leave it off.")


# ---- the op group --------------------------------------------------------------------------------

_groups = OpGroups("bind_attention")


def use_ops(op_group: Any | None) -> None:
    """Use ``op_group`` (anything with ``make_attention_plan``, ``bind_attention`` and ``varlen_attention_out``,
    or a dict of ops such as
    ``attn_dispatch_cuda_fa3.build_ops(provider)``) on every device, or None to go back to
    ``attn_dispatch.load(device)``. The seam for tests (a CPU stand-in provider)."""
    _groups.use(SimpleNamespace(**op_group) if isinstance(op_group, Mapping) else op_group)


def ops_for(device: torch.device) -> Any | None:
    """The op group for ``device``, or None where the attention ops are the reference: there the attention
    calls ``sdpa``, which computes the same without unpadding."""
    return _groups.get(device)


# ---- the mask function ---------------------------------------------------------------------------


def attn_dispatch_mask(
    batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
    mask_function: Any = masking_utils.causal_mask_function, attention_mask: torch.Tensor | None = None, **kwargs: Any,
) -> torch.Tensor | None:  # fmt: skip
    """``sdpa_mask`` with the same arguments (so ``sdpa`` can take its result), recording what the mask
    was made from when its pattern is one the fast path computes (plain or sliding-window causal)."""
    mask = masking_utils.sdpa_mask(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
        mask_function=mask_function, attention_mask=attention_mask, **kwargs,
    )  # fmt: skip
    if mask is None or not isinstance(q_length, int) or not isinstance(kv_length, int):
        return mask
    known, window = _causal_pattern(mask_function)
    if known and isinstance(q_offset, (int, torch.Tensor)) and isinstance(kv_offset, int):
        padding = masking_utils.prepare_padding_mask(attention_mask, kv_length, kv_offset)
        meta.remember(
            mask, padding=padding, batch=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
            kv_offset=kv_offset, window=window,
        )  # fmt: skip
    return mask


def _causal_pattern(mask_function: Any) -> tuple[bool, int | None]:
    """(True, None) for ``causal_mask_function``; (True, window) for ``sliding_window_causal_mask_function``
    (read from its closures: 5.17's ``and_masks(sliding_window_overlay(w), causal_mask_function)``);
    (False, None) for anything else (packed sequences, chunks, custom or/and masks)."""
    if mask_function is masking_utils.causal_mask_function:
        return True, None
    parts = _closure_value(mask_function, "mask_functions")
    if not isinstance(parts, tuple) or len(parts) != 2 or parts[1] is not masking_utils.causal_mask_function:
        return False, None
    overlay = parts[0]
    if getattr(overlay, "__qualname__", "") != "sliding_window_overlay.<locals>.inner_mask":
        return False, None
    window = _closure_value(overlay, "sliding_window")
    return (True, window) if isinstance(window, int) and window > 0 else (False, None)


def _closure_value(function: Any, name: str) -> Any:
    code, cells = getattr(function, "__code__", None), getattr(function, "__closure__", None)
    if code is None or not cells or name not in code.co_freevars:
        return None
    return cells[code.co_freevars.index(name)].cell_contents


# ---- the attention function ------------------------------------------------------------------------


def attn_dispatch_attention(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, **kwargs: Any,
) -> tuple[torch.Tensor, None]:  # fmt: skip
    """transformers attention: q ``[B, H, Q, D]``, k/v ``[B, H_kv, K, D]``; returns (``[B, Q, H, D]``,
    None). See the module doc for when it runs FlashAttention and when ``sdpa``."""
    ops = _fast_ops(module, query, key, value, kwargs)
    if ops is not None:
        window = kwargs.get("sliding_window")
        if attention_mask is None:
            batch, _, q_len, _ = query.shape
            return _attention(ops, build.unpadded(query.device, batch, q_len, key.shape[2]), query, key, value, kwargs, window), None
        record = meta.lookup(attention_mask)
        if record is not None and record.window == window and _shapes_match(record, query, key):
            unpad = build.metadata(record, ops)
            if unpad.pages:
                out = _decode_attention(ops, unpad, query, key, value, kwargs, window)
                if out is not None:
                    return out, None
            elif unpad.exact:
                return _attention(ops, unpad, query, key, value, kwargs, window), None
    return sdpa_attention.sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


_FLASH_DTYPES = (torch.float16, torch.bfloat16)


def _fast_ops(module, query, key, value, kwargs) -> Any | None:
    """The op group when this call may take the fast path (the module doc's list, mask aside), else None.
    Every layer asks, in a host-bound decode step: plain attribute reads, cheapest first."""
    if kwargs.get("output_attentions") or kwargs.get("dropout") or kwargs.get("position_bias") is not None:
        return None
    if not kwargs.get("is_causal", getattr(module, "is_causal", True)):
        return None
    dtype, q_shape, k_shape, v_shape = query.dtype, query.shape, key.shape, value.shape
    if dtype not in _FLASH_DTYPES or key.dtype is not dtype or value.dtype is not dtype:
        return None
    if len(q_shape) != 4 or len(k_shape) != 4 or len(v_shape) != 4 or v_shape[:3] != k_shape[:3]:
        return None
    batch, heads, _, head_dim = q_shape
    if k_shape[0] != batch or heads % k_shape[1] or k_shape[3] != head_dim or v_shape[3] != head_dim:
        return None
    if head_dim % 8 or head_dim > MAX_HEAD_DIM:
        return None
    device = query.device
    if key.device != device or value.device != device:
        return None
    if (query.requires_grad or key.requires_grad or value.requires_grad) and torch.is_grad_enabled():
        return None
    if torch.compiler.is_compiling():  # the first layer's metadata build syncs: keep a traced graph whole
        return None
    return ops_for(device)


def _shapes_match(record: meta.MaskRecord, query: torch.Tensor, key: torch.Tensor) -> bool:
    return record.batch == query.shape[0] and record.q_length == query.shape[2] and record.kv_length == key.shape[2]


def _attention(ops, unpad: meta.Meta, query, key, value, kwargs, window) -> torch.Tensor:
    """The forward's planned FlashAttention (metadata made once per forward) for this layer: read in place
    into a new ``[B, Q, H, D]`` output (padded plan), or unpad with the forward's indices, run into the
    forward's output buffer, and re-pad (packed plan)."""
    batch, heads, q_len, head_dim = query.shape
    run = unpad.run_for(ops, query, key.shape[1], window, kwargs.get("softcap"), kwargs.get("scaling"))
    if unpad.padded:
        out = query.new_empty(batch, q_len, heads, head_dim)
        return run(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), out)
    movers = unpad.packed().movers  # varlen_diffusion's fused row movers on CUDA (attn_dispatch_flash.rows)
    k, v = movers.pack_kv(key.transpose(1, 2), value.transpose(1, 2))  # from the [B, K, H, D] views
    out = unpad.out_buffer(query, heads, head_dim)
    run(movers.pack_q(query.transpose(1, 2)), k, v, out)
    return movers.scatter(out)  # [B, Q, H, D], zeros in padded rows


def _decode_attention(ops, unpad: meta.Meta, query, key, value, kwargs, window) -> torch.Tensor | None:
    """A decode step's layer over the step's one-row pages (``transformers_decode``): q ``[B, H, 1, D]``
    read as ``[B, H, D]``, the caches in place, into a new ``[B, 1, H, D]`` output. None (the caller runs
    ``sdpa``) for caches laid out otherwise, or for an op group that cannot read one-row pages (it is
    then kept to host-built plans, and a warning says so once)."""
    k_pages, v_pages = decode.paged_keys(key), decode.paged_keys(value)
    if k_pages is None or v_pages is None:
        return None
    batch, heads, _, head_dim = query.shape
    out = query.new_empty(batch, 1, heads, head_dim)
    try:
        run = unpad.run_for(ops, query, key.shape[1], window, kwargs.get("softcap"), kwargs.get("scaling"))
        run(query[:, :, 0], k_pages, v_pages, out.view(batch, heads, head_dim))
    except Exception as exc:  # noqa: BLE001 - refused before anything is written: sdpa answers instead
        if meta.reads_in_place(ops):
            log.warning("attn_dispatch: decode steps over one-row pages refused (%s); using host-built plans", exc)
            meta.refuse_in_place(ops)
        return None
    return out


# ---- registration ----------------------------------------------------------------------------------


def register() -> str:
    """Register the attention and its mask function under :data:`NAME` (done on import; idempotent)."""
    check_transformers_version()
    AttentionInterface.register(NAME, attn_dispatch_attention)
    masking_utils.AttentionMaskInterface.register(NAME, attn_dispatch_mask)
    transformers_paged.register(AttentionInterface)  # "paged|attn_dispatch": continuous batching
    return NAME


register()

stats = meta.stats

__all__ = [
    "MAX_HEAD_DIM",
    "NAME",
    "SUPPORTED_TRANSFORMERS",
    "UnsupportedTransformersVersion",
    "attn_dispatch_attention",
    "attn_dispatch_mask",
    "check_transformers_version",
    "ops_for",
    "register",
    "stats",
    "use_ops",
]
