"""An ``attn_dispatch`` attention backend for diffusers (supported: diffusers 0.42.x).

Importing this module registers the backend in diffusers' attention dispatcher, so a stock model uses
it with ``model.set_attention_backend("attn_dispatch")`` or ``with attention_backend("attn_dispatch"):``.
:func:`enable` does that for a pipeline's transformer(s) (or one model) and also installs the
per-forward mask-metadata scope (``diffusers_scope``), which builds a forward's mask metadata once,
before its blocks. With ``set_attention_backend`` alone every masked call builds its metadata itself
(correct, but one host sync per call).

What runs where (per ``dispatch_attention_fn`` call):

- the fast path, ``ops.masked_attention`` (``attn_dispatch.load(device)``; the varlen_diffusion plugin
  on sm90/sm100): a boolean key-padding mask ``[B, 1, 1, S_k]`` or ``[B, S_k]``, q/k/v ``[B, S, H, D]``
  in fp16/bf16 with one dtype and device, a head dim that is a multiple of 8 and at most 256, no
  dropout, not causal, no ``return_lse``, no GQA, no context parallelism, and no autograd (no input
  requiring grad with grad enabled);
  Output: the plugin's contract (valid query rows to FlashAttention tolerance of SDPA; masked query rows
  as SDPA computes them), except that a batch row with no valid key at all comes out as zeros, where
  SDPA gives NaN or zeros depending on its kernel;
- diffusers' native backend, called with exactly the arguments it would have got (so byte-identical):
  everything else, including calls without a mask (SDPA picks its flash kernel itself), float
  (additive) masks, other mask shapes, and devices where ``masked_attention`` resolved to the reference.

In a forward whose model mask ``enable``'s scope elided (``diffusers_scope``: Qwen-Image, PRX), a call
without a mask whose keys are the forward's joint keys is first given the joint mask the processor would
have built; then the rules above apply to it.

Any diffusers version other than 0.42.x makes the import (and :func:`enable`) raise
:class:`UnsupportedDiffusersVersion`: the backend patches diffusers' backend enum, which is private API.
"""

from __future__ import annotations

import enum
from typing import Any

import torch

from . import diffusers_scope as scope
from .common import OpGroups, check_series

try:
    import diffusers
    from diffusers.models import attention_dispatch as _dispatch
except ImportError as exc:  # pragma: no cover - the extra is not installed
    raise ImportError(
        "attn_dispatch.integrations.diffusers needs diffusers 0.42.x: pip install 'diffusers==0.42.*'"
        " (or, in an attn_dispatch checkout, pip install '.[diffusers]')"
    ) from exc


BACKEND_NAME = "attn_dispatch"
SUPPORTED_DIFFUSERS = ("0.42",)  # major.minor series this module was written and tested against
MAX_HEAD_DIM = 256


class UnsupportedDiffusersVersion(RuntimeError):
    """The installed diffusers is not one this integration supports (see ``SUPPORTED_DIFFUSERS``)."""


def check_diffusers_version(version: str | None = None) -> None:
    """Raise :class:`UnsupportedDiffusersVersion` unless ``version`` (default: installed) is supported."""
    version = diffusers.__version__ if version is None else version
    check_series("diffusers", version, SUPPORTED_DIFFUSERS, UnsupportedDiffusersVersion, "leave the backend off; it is not enabled.")


# ---- the op group --------------------------------------------------------------------------------


def _refuse(ops: Any) -> str | None:
    if _zeroes_masked_queries(ops):
        return (
            "masked_attention zeroes masked query rows (ATTN_DISPATCH_VARLEN_DIFFUSION_STRATEGY=qkv_pack), which "
            "diffusers' attention does not: diffusers' native attention runs there; set the strategy to kv_pack "
            "for the fast path"
        )
    return None


_groups = OpGroups("masked_attention", refuse=_refuse)


def use_ops(op_group: Any | None) -> None:
    """Use ``op_group`` (anything with ``build_mask_meta`` and ``masked_attention``) on every device, or
    None to go back to ``attn_dispatch.load(device)``. The seam for tests (a CPU stand-in provider)."""
    _groups.use(op_group)


def ops_for(device: torch.device) -> Any | None:
    """The op group for ``device``, or None where ``masked_attention`` is the reference (SDPA), or the group
    zeroes masked query rows: there the backend calls diffusers' native attention instead."""
    return _groups.get(device)


def _zeroes_masked_queries(ops: Any) -> bool:
    """Whether the op group answers masked query rows with zeros (varlen_diffusion's qkv_pack contract).
    diffusers' processors expect SDPA's rows there, and the op tells self- from cross-attention only by
    S_q == S_k, so such a group is not used."""
    implementation = getattr(ops.masked_attention, "__self__", None)
    strategy = getattr(implementation, "general_strategy", None)
    return getattr(strategy, "value", strategy) == "qkv_pack"


# ---- the backend ----------------------------------------------------------------------------------


def _add_backend_name() -> enum.Enum:
    """Add ``ATTN_DISPATCH = "attn_dispatch"`` to diffusers' ``AttentionBackendName`` (idempotent).

    diffusers validates backend names against that enum (``set_attention_backend``, ``attention_backend``,
    ``dispatch_attention_fn``), and enums take no new members after creation, so the member is made and
    entered in the enum's lookup tables by hand, as ``Enum`` itself does for its declared members.
    """
    names = _dispatch.AttentionBackendName
    existing = names._value2member_map_.get(BACKEND_NAME)
    if existing is not None:
        return existing
    member = str.__new__(names, BACKEND_NAME)
    member._name_ = "ATTN_DISPATCH"
    member._value_ = BACKEND_NAME
    member.__objclass__ = names
    member._sort_order_ = len(names._member_names_)
    type.__setattr__(names, "ATTN_DISPATCH", member)  # before the member map lists it (else "cannot reassign")
    names._member_map_["ATTN_DISPATCH"] = member
    names._value2member_map_[BACKEND_NAME] = member
    names._member_names_.append("ATTN_DISPATCH")
    return member


def _attn_dispatch_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    _parallel_config: Any = None,
) -> torch.Tensor:
    """diffusers backend: key-padding-masked attention through ``ops.masked_attention``; see module doc.

    Same parameters as diffusers' native backend, so ``dispatch_attention_fn`` hands both the same
    arguments and the fallback forwards them unchanged.
    """
    current = scope.current() if scope._stack else None
    if attn_mask is None and current is not None:  # a forward whose model mask the scope elided: the joint mask
        attn_mask = current.elided_mask(query, key)
    mask = _key_padding_mask(query, key, value, attn_mask, dropout_p, is_causal, return_lse, _parallel_config)
    ops = None if mask is None else ops_for(query.device)
    if ops is None:
        return _native(
            query=query, key=key, value=value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
            scale=scale, enable_gqa=enable_gqa, return_lse=return_lse, _parallel_config=_parallel_config,
        )  # fmt: skip
    meta = None if current is None else current.lookup(mask)
    if meta is None:
        if torch.compiler.is_compiling():  # building metadata syncs: keep the traced graph whole
            return _native(
                query=query, key=key, value=value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                scale=scale, enable_gqa=enable_gqa, return_lse=return_lse, _parallel_config=_parallel_config,
            )  # fmt: skip
        meta = ops.build_mask_meta(mask[:, 0, 0, :] if mask.dim() == 4 else mask)
        if current is not None:
            current.remember(mask, meta)
    return ops.masked_attention(query, key, value, meta, softmax_scale=scale)


def _key_padding_mask(query, key, value, attn_mask, dropout_p, is_causal, return_lse, parallel_config):
    """``attn_mask`` when the fast path can run this call exactly (a bool key-padding mask ``[B, 1, 1, S_k]``
    or ``[B, S_k]``, and the rest of the module doc's list), else None. Host-only checks, cheapest first:
    this runs in every attention call."""
    if attn_mask is None or attn_mask.dtype is not torch.bool or parallel_config is not None:
        return None
    if dropout_p or is_causal or return_lse:
        return None
    q_shape, k_shape = query.shape, key.shape
    if len(q_shape) != 4 or len(k_shape) != 4 or value.shape != k_shape:
        return None
    batch, seq_k, heads, head_dim = k_shape
    if q_shape[0] != batch or q_shape[2] != heads or q_shape[3] != head_dim or head_dim % 8 or head_dim > MAX_HEAD_DIM:
        return None  # GQA and other head layouts, and head dims FlashAttention does not take
    dtype = query.dtype
    if (dtype is not torch.bfloat16 and dtype is not torch.float16) or key.dtype is not dtype or value.dtype is not dtype:
        return None
    if attn_mask.device != query.device:
        return None
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return None
    m_shape = attn_mask.shape
    if len(m_shape) == 4:
        return attn_mask if m_shape[1] == 1 and m_shape[2] == 1 and m_shape[0] == batch and m_shape[3] == seq_k else None
    return attn_mask if len(m_shape) == 2 and m_shape[0] == batch and m_shape[1] == seq_k else None


def _native(**kwargs: Any) -> torch.Tensor:
    """diffusers' native backend, looked up per call (so a test or a user's own patch of it is honoured)."""
    return _dispatch._AttentionBackendRegistry._backends[_dispatch.AttentionBackendName.NATIVE](**kwargs)


def _is_ours(backend: Any) -> bool:
    """Whether a processor's ``_attention_backend`` selects this backend (None: the active one)."""
    if backend is None:
        backend = _dispatch._AttentionBackendRegistry._active_backend
    return backend is ATTN_DISPATCH or backend == BACKEND_NAME


def register() -> enum.Enum:
    """Register the backend (done on import; idempotent). Returns its ``AttentionBackendName`` member."""
    check_diffusers_version()
    member = _add_backend_name()
    if member not in _dispatch._AttentionBackendRegistry._backends:
        _dispatch._AttentionBackendRegistry.register(
            member,
            constraints=[_dispatch._check_device, _dispatch._check_shape],
            supports_context_parallel=True,  # accepted, and run by the native backend's context-parallel path
        )(_attn_dispatch_attention)
    return member


ATTN_DISPATCH = register()


# ---- enabling it on models and pipelines -----------------------------------------------------------


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """``model``'s attention modules whose processor goes through diffusers' dispatcher."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    return [
        m for m in model.modules()
        if isinstance(m, (Attention, AttentionModuleMixin)) and hasattr(getattr(m, "processor", None), "_attention_backend")
    ]  # fmt: skip


def transformers_of(pipe_or_model: Any) -> list[torch.nn.Module]:
    """The diffusers models to enable: ``pipe_or_model`` itself if it is a ``ModelMixin``, else each
    pipeline component (``transformer``, ``transformer_2``, ...) that is a ``ModelMixin`` with attention
    processors going through the dispatcher. Raises ``ValueError`` when there is none."""
    from diffusers import ModelMixin

    if isinstance(pipe_or_model, ModelMixin):
        candidates = [pipe_or_model]
    else:
        components = getattr(pipe_or_model, "components", None)
        if not isinstance(components, dict):
            raise ValueError(f"pipe_or_model: expected a diffusers pipeline or ModelMixin, got {type(pipe_or_model).__name__}")
        candidates = [c for c in components.values() if isinstance(c, ModelMixin)]
    models = [m for m in candidates if attention_modules(m)]
    if not models:
        raise ValueError(f"pipe_or_model: {type(pipe_or_model).__name__} has no model whose attention goes through diffusers' dispatcher")
    return models


def enable(pipe_or_model: Any, *, reuse_across_forwards: bool = True, elide_model_mask: bool = True) -> list[torch.nn.Module]:
    """Use the ``attn_dispatch`` backend in ``pipe_or_model``'s transformer(s) and build each forward's
    mask metadata once (the scope hooks). Returns the models enabled. Idempotent (a second call keeps the
    first call's hooks and settings).

    ``reuse_across_forwards``: reuse the joint-mask metadata when a later forward passes the same, unwritten
    text-mask tensor (a pipeline's denoising steps); off: built once in every forward.
    ``elide_model_mask``: for models with a joint-mask recipe (Qwen-Image, PRX), hand the model no text
    mask and mask its attention calls from the metadata instead, so it skips building the mask in every
    block; off: the model gets its mask. Same output either way. See ``diffusers_scope``.

    Like ``model.set_attention_backend``, this also makes ``attn_dispatch`` diffusers' active backend.
    """
    check_diffusers_version()
    models = transformers_of(pipe_or_model)
    for model in models:
        model.set_attention_backend(BACKEND_NAME)
        scope.install(
            model, attention_modules(model), backend=ATTN_DISPATCH, is_ours=_is_ours, ops_for=ops_for,
            reuse_across_forwards=reuse_across_forwards, elide_model_mask=elide_model_mask,
        )  # fmt: skip
    return models


def disable(pipe_or_model: Any) -> list[torch.nn.Module]:
    """Undo :func:`enable`: back to diffusers' native backend, hooks removed. Returns the models."""
    models = transformers_of(pipe_or_model)
    for model in models:
        scope.uninstall(model)
        model.set_attention_backend(_dispatch.AttentionBackendName.NATIVE.value)
    return models


__all__ = [
    "ATTN_DISPATCH",
    "BACKEND_NAME",
    "SUPPORTED_DIFFUSERS",
    "UnsupportedDiffusersVersion",
    "attention_modules",
    "check_diffusers_version",
    "disable",
    "enable",
    "ops_for",
    "register",
    "transformers_of",
    "use_ops",
]
