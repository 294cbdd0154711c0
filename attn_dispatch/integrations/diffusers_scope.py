"""Mask metadata at most once per transformer forward, never stale: the per-forward scope.

``build_mask_meta`` costs one host sync (and ~390 us at Qwen-Image's shape on the H200). diffusers'
processors rebuild their mask in every block, so building metadata per attention call would sync once
per block. Instead :func:`install` puts two hooks on a transformer (``enable()`` does this):

- a forward **pre-hook** opens a :class:`ForwardScope` for this forward. For a model with a known
  joint-mask recipe (:data:`RECIPES`: Qwen-Image, PRX), it also builds the metadata of the joint key
  mask ``cat([text mask, ones(image tokens)])`` here, from this forward's own arguments, before any block
  runs: the forward's one host sync happens outside every block;
- a forward **hook** (``always_call=True``: it also runs when the forward raises) closes the scope.

Inside the scope the backend finds a call's metadata in two ways (``lookup``):

1. the recipe's joint metadata, for a bool key-padding mask of exactly its ``[B, S_k]`` on its device. Sound
   because the scope is only given a recipe when the model's class, its ``forward`` and every attention
   processor are the stock diffusers ones (checked at every pre-hook): those processors build their mask
   from the same text mask as ``cat([mask, ones])``, so a mask of that shape in this forward has these
   contents;
2. identity: a mask tensor already seen in this scope (same storage, offset, shape, strides and
   ``_version``; never an inference tensor, which has no ``_version``) reuses its metadata. The scope holds a reference to each mask it saw, so a freed mask's
   memory cannot be reused by a new mask with the same address during the scope. Cross-attention models
   pass one mask (or views of it) to every block.

Otherwise the backend builds metadata per call (correct; one sync). Never stale: a scope lives for one
forward only and nothing survives it; a new prompt, a CFG batch or a different text length is a new
forward with new metadata.

Across forwards (``reuse_across_forwards``, default on): a pipeline passes the same text-mask tensor to
the transformer at every denoising step (cond and uncond alternate under CFG). The pre-hook keeps the
joint metadata of the last :data:`MEMO_SIZE` text-mask tensors per model, keyed like rule 2 (storage,
offset, shape, strides, ``_version``, dtype, device) plus the image-token count, and holds each tensor so
its memory cannot be reused by another. A repeated, unwritten mask then costs no build and no sync at all.
Contents can change only through an in-place torch op (which moves ``_version``: rebuilt) or behind
torch's back (``.data``, numpy or DLPack views, foreign kernels): pass a new tensor then, or
``enable(..., reuse_across_forwards=False)``. Threads: each scope records its thread, and eager lookups
see only their own thread's scopes, so concurrent eager forwards never share metadata. Compiled forwards
take the innermost scope (the stack is a module global so torch.compile can read it): one compiled
forward at a time per process.

torch.compile: the hooks are ``torch.compiler.disable``d, so they run eagerly around the compiled
forward (a graph break before and after the blocks, none inside attention). In traced code only the
recipe's metadata is used (tensor identity means nothing there); any other masked call runs diffusers'
native attention, which traces without a break.
"""

from __future__ import annotations

import importlib
import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from attn_dispatch.plans import MaskMeta

FLASH_DTYPES = (torch.float16, torch.bfloat16)
MEMO_SIZE = 4  # text masks remembered across forwards per model: cond + uncond (CFG), with room to spare


@dataclass(frozen=True)
class JointMaskRecipe:
    """How a model's processors build their key mask: ``cat([text mask as bool, ones(image tokens)])``.

    ``model``: a class name exported by ``diffusers``; ``processor``: its stock processor class, by name in
    ``processor_module``.
    ``text_mask_arg``: the forward argument holding the ``[B, L_txt]`` text mask (None: no mask, no
    metadata). ``image_tokens(model, hidden_states)``: the number of image tokens for this forward.
    """

    model: str
    processor: str
    processor_module: str
    text_mask_arg: str
    image_tokens: Callable[[Any, torch.Tensor], int]


def _qwen_image_tokens(model: Any, hidden_states: torch.Tensor) -> int:
    return hidden_states.shape[1]  # already patchified: [B, image tokens, in_channels]


def _prx_image_tokens(model: Any, hidden_states: torch.Tensor) -> int:
    patch = model.config.patch_size  # [B, C, H, W] latents, cut into patch x patch tiles (img2seq)
    return (hidden_states.shape[-2] // patch) * (hidden_states.shape[-1] // patch)


RECIPES: tuple[JointMaskRecipe, ...] = (
    JointMaskRecipe(
        "QwenImageTransformer2DModel", "QwenDoubleStreamAttnProcessor2_0",
        "diffusers.models.transformers.transformer_qwenimage", "encoder_hidden_states_mask", _qwen_image_tokens,
    ),
    JointMaskRecipe(
        "PRXTransformer2DModel", "PRXAttnProcessor2_0",
        "diffusers.models.transformers.transformer_prx", "attention_mask", _prx_image_tokens,
    ),
)  # fmt: skip


@dataclass(frozen=True, eq=False)
class JointMeta:
    """The recipe's metadata for this forward: a bool ``[batch, seqlen]`` key mask on ``device``."""

    batch: int
    seqlen: int
    device: torch.device
    meta: MaskMeta


class ForwardScope:
    """What one transformer forward knows about its masks. Made by the pre-hook, dropped by the hook."""

    __slots__ = ("model", "joint", "seen", "thread")

    def __init__(self, model: torch.nn.Module, joint: JointMeta | None) -> None:
        self.model = model
        self.joint = joint
        self.thread = threading.get_ident()  # eager lookups see only their own thread's scopes
        self.seen: list[tuple[torch.Tensor, tuple, MaskMeta]] = []

    def lookup(self, mask: torch.Tensor) -> MaskMeta | None:
        """Metadata for the bool key-padding mask ``mask`` (``[B, 1, 1, S_k]`` or ``[B, S_k]``) if this scope
        already has it, else None."""
        joint = self.joint
        if joint is not None:
            shape = mask.shape
            if shape[0] == joint.batch and shape[-1] == joint.seqlen and mask.device == joint.device:
                return joint.meta
        if torch.compiler.is_compiling():  # no tensor identity in traced code
            return None
        key = _identity(mask)
        if key is None:
            return None
        for _, seen_key, meta in self.seen:
            if seen_key == key:
                return meta
        return None

    def remember(self, mask: torch.Tensor, meta: MaskMeta) -> None:
        """Keep ``meta`` for ``mask`` until the forward ends (eager only)."""
        if not torch.compiler.is_compiling():
            key = _identity(mask)
            if key is not None:
                self.seen.append((mask, key, meta))  # the reference keeps mask's memory from reuse


def _identity(mask: torch.Tensor) -> tuple | None:
    """What makes two mask tensors the same, unwritten one; None for an inference tensor (made under
    ``torch.inference_mode``): it has no version counter (``_version`` raises), so an in-place write
    could not be seen, and it is never reused by identity."""
    if mask.is_inference():
        return None
    return (
        mask.untyped_storage().data_ptr(), mask.storage_offset(), tuple(mask.shape), mask.stride(),
        mask._version, mask.dtype, mask.device,
    )  # fmt: skip


# Innermost scope last. A module global (not threading.local) so that dynamo can read it; each scope
# records its thread, so two threads' forwards in eager mode never see each other's metadata.
_stack: list[ForwardScope] = []


def current() -> ForwardScope | None:
    """This thread's innermost open scope, or None outside every hooked forward. Traced code (one
    forward at a time) takes the innermost scope."""
    if torch.compiler.is_compiling():
        return _stack[-1] if _stack else None
    thread = threading.get_ident()
    for scope in reversed(_stack):
        if scope.thread == thread:
            return scope
    return None


@dataclass(eq=False)
class _Installed:
    """Per hooked model: its recipe (if any), where its forward takes the mask, and its attention modules."""

    recipe: JointMaskRecipe | None
    mask_index: int  # positional index of the text-mask argument in forward (self excluded)
    modules: tuple[torch.nn.Module, ...]  # modules with a dispatcher-aware processor
    processor_cls: type | None  # the recipe's stock processor class
    backend: Any  # the backend's AttentionBackendName member
    handles: tuple
    is_ours: Callable[[Any], bool]  # backend value -> is it attn_dispatch (set by the backend module)
    ops_for: Callable[[torch.device], Any]  # device -> op group (set by the backend module)
    reuse_across_forwards: bool = True
    # (text mask as passed, op group, its identity key + image tokens, JointMeta), most recent last
    memo: list = field(default_factory=list)


def recipe_for(model: torch.nn.Module) -> JointMaskRecipe | None:
    """The recipe whose model class (with its own ``forward``) ``model`` is, or None."""
    import diffusers

    for recipe in RECIPES:
        cls = getattr(diffusers, recipe.model, None)
        if cls is not None and isinstance(model, cls) and type(model).forward is cls.forward:
            return recipe
    return None


def install(model: torch.nn.Module, modules, *, backend, is_ours, ops_for, reuse_across_forwards: bool = True) -> None:
    """Put the scope hooks on ``model`` (idempotent). ``modules``: its attention modules; ``backend``: the
    backend's enum member; ``is_ours(value)``: whether a processor's backend value selects it;
    ``ops_for(device)``: the op group there (None: the reference, so no metadata);
    ``reuse_across_forwards``: keep the joint metadata of the last few text-mask tensors (see module doc)."""
    if getattr(model, "_attn_dispatch_scope", None) is not None:
        return
    recipe = recipe_for(model)
    index, processor_cls = -1, None
    if recipe is not None:
        names = list(inspect.signature(type(model).forward).parameters)[1:]
        index = names.index(recipe.text_mask_arg)
        processor_cls = getattr(importlib.import_module(recipe.processor_module), recipe.processor)
    pre = model.register_forward_pre_hook(_open_scope, with_kwargs=True)
    post = model.register_forward_hook(_close_scope, with_kwargs=True, always_call=True)
    model._attn_dispatch_scope = _Installed(
        recipe, index, tuple(modules), processor_cls, backend, (pre, post), is_ours, ops_for, reuse_across_forwards
    )


def uninstall(model: torch.nn.Module) -> None:
    installed = getattr(model, "_attn_dispatch_scope", None)
    if installed is not None:
        for handle in installed.handles:
            handle.remove()
        model._attn_dispatch_scope = None


@torch.compiler.disable
def _open_scope(model: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    installed: _Installed = model._attn_dispatch_scope
    joint = None
    if installed.recipe is not None:
        joint = _joint_meta(model, installed, args, kwargs)
    _stack.append(ForwardScope(model, joint))


@torch.compiler.disable
def _close_scope(model: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    thread = threading.get_ident()
    mine = [i for i, scope in enumerate(_stack) if scope.thread == thread]
    for i in reversed(mine):
        if _stack[i].model is model:
            # with any inner scope of this thread a failed inner forward left behind
            for j in reversed([j for j in mine if j >= i]):
                del _stack[j]
            return


def _joint_meta(model: torch.nn.Module, installed: _Installed, args: tuple, kwargs: dict) -> JointMeta | None:
    """The joint mask's metadata for this forward, or None where the recipe does not apply."""
    recipe = installed.recipe
    text_mask = kwargs.get(recipe.text_mask_arg)
    if text_mask is None and len(args) > installed.mask_index:
        text_mask = args[installed.mask_index]
    hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else (args[0] if args else None)
    if not isinstance(text_mask, torch.Tensor) or text_mask.dim() != 2 or not isinstance(hidden_states, torch.Tensor):
        return None
    # Only when the backend would run the fast path in this forward: every processor stock and ours.
    processor_cls, ours = installed.processor_cls, installed.backend
    for module in installed.modules:
        processor = module.processor
        if type(processor) is not processor_cls:
            return None
        backend = processor._attention_backend
        if backend is not ours and not installed.is_ours(backend):  # the identity test settles the usual case
            return None
    # The attention inputs' dtype is the projections' (ModelMixin.dtype walks every module: milliseconds).
    dtype = next(installed.modules[0].parameters()).dtype
    device = hidden_states.device
    if dtype not in FLASH_DTYPES and not torch.is_autocast_enabled(device.type):
        return None
    if text_mask.device != device or text_mask.shape[0] != hidden_states.shape[0]:
        return None  # let the model raise its own error
    ops = installed.ops_for(device)
    if ops is None:
        return None
    image_tokens = recipe.image_tokens(model, hidden_states)
    identity = _identity(text_mask)
    reuse = installed.reuse_across_forwards and identity is not None
    key = (identity, image_tokens)
    memo = installed.memo if reuse else []
    for i, (held_mask, held_ops, held_key, held) in enumerate(memo):
        if held_ops is ops and held_key == key:  # the pipeline's same mask tensor, unwritten: same contents
            memo.append(memo.pop(i))
            return held
    batch = text_mask.shape[0]
    as_bool = text_mask if text_mask.dtype == torch.bool else text_mask.to(torch.bool)  # as the model does
    image = torch.ones((batch, image_tokens), dtype=torch.bool, device=device)
    joint = torch.cat([as_bool, image], dim=1)
    meta = JointMeta(batch, joint.shape[1], device, ops.build_mask_meta(joint))
    if reuse:
        memo.append((text_mask, ops, key, meta))  # holding the mask keeps its memory from reuse
        del memo[:-MEMO_SIZE]
    return meta
