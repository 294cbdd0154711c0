"""Mask metadata at most once per transformer forward, never stale: the per-forward scope.

``build_mask_meta`` costs one host sync (and ~390 us at Qwen-Image's shape on the H200). diffusers'
processors rebuild their mask in every block, so building metadata per attention call would sync once
per block. Instead :func:`install` puts two hooks on a transformer (``enable()`` does this):

- a forward **pre-hook** opens a :class:`ForwardScope` for this forward. For a model with a known
  joint-mask recipe (``diffusers_recipes.RECIPES``: Qwen-Image, PRX), it also builds the metadata of the
  joint key mask ``cat([text mask, ones(image tokens)])`` here, from this forward's own arguments,
  before any block runs: the forward's one host sync happens outside every block;
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

Mask elision (``elide_model_mask``, default on): where the recipe's metadata is built, the pre-hook also
hands the model ``None`` for its text mask, so the model skips its own mask work: Qwen-Image's mask
checks and conversion before the blocks (five small kernels) and, in every block, the processor's
``ones`` + ``cat`` of the joint mask (host time in a host-bound eager model, and a few small kernels).
The backend then masks each maskless call whose keys are the joint ones (``[B, S_k]`` and device) with
the recipe's joint mask (``elided_mask``): the fast path with the recipe's metadata, or diffusers'
native attention with that mask, whose values are exactly the ones the processor would have built, so
the output is the same bytes as without elision. Sound for the same reasons as rule 1 (the recipe's
processors are the only attention in the forward, and use the text mask for nothing else), and only
where the mask has the ``[B, L_txt]`` the model accepts (otherwise the model gets it and raises its
own error) and no processor has a context-parallel config. Forward pre-hooks registered on the model
after ``enable`` see the elided ``None``.

Otherwise the backend builds metadata per call (correct; one sync). Never stale: a scope lives for one
forward only and nothing survives it; a new prompt, a CFG batch or a different text length is a new
forward with new metadata.

Across forwards (``reuse_across_forwards``, default on): a pipeline passes the same text-mask tensor to
the transformer at every denoising step (cond and uncond alternate under CFG). The pre-hook keeps the
joint metadata of the last :data:`MEMO_SIZE` text-mask tensors per model, keyed like rule 2 (storage,
offset, shape, strides, ``_version``, dtype, device) plus the image-token count and whether the mask
was elided, and holds each tensor so its memory cannot be reused by another. A repeated, unwritten mask then costs no build and no sync at all.
Contents can change only through an in-place torch op (which moves ``_version``: rebuilt) or behind
torch's back (``.data``, numpy or DLPack views, foreign kernels): pass a new tensor then, or
``enable(..., reuse_across_forwards=False)``. Threads: each scope records its thread, and eager lookups
see only their own thread's scopes, so concurrent eager forwards never share metadata. Compiled forwards
take the innermost scope (the stack is a module global so torch.compile can read it): one compiled
forward at a time per process.

torch.compile: the hooks are ``torch.compiler.disable``d, so they run eagerly around the compiled
forward (no graph break; the pre-hook's new arguments, with the elided mask, reach the compiled
forward). In traced code only the recipe's metadata is used (tensor identity means nothing there); any
other masked call runs diffusers' native attention, which traces without a break.
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

from .diffusers_recipes import JointMaskRecipe, recipe_for

FLASH_DTYPES = (torch.float16, torch.bfloat16)
MEMO_SIZE = 4  # text masks remembered across forwards per model: cond + uncond (CFG), with room to spare


@dataclass(frozen=True, eq=False)
class JointMeta:
    """The recipe's metadata for this forward: a bool ``[batch, seqlen]`` key mask on ``device``.

    ``mask``: that key mask as the stock processor hands it to attention (``[batch, 1, 1, seqlen]``).
    ``elided``: the model was given no text mask in this forward; its maskless attention calls of this
    key shape are masked with ``mask`` (see the module doc).
    """

    batch: int
    seqlen: int
    device: torch.device
    meta: MaskMeta
    mask: torch.Tensor
    elided: bool = False


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

    def elided_mask(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
        """The joint key mask for a maskless call, if this forward's model mask was elided and the call's
        keys are the joint ones (batch, length, device); else None (the call had no mask)."""
        joint = self.joint
        if joint is None or not joint.elided:
            return None
        shape = key.shape
        if len(shape) == 4 and shape[0] == joint.batch and shape[1] == joint.seqlen and key.device == joint.device:
            return joint.mask
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
    text_index: int  # and of the text states
    modules: tuple[torch.nn.Module, ...]  # modules with a dispatcher-aware processor
    processor_cls: type | None  # the recipe's stock processor class
    backend: Any  # the backend's AttentionBackendName member
    handles: tuple
    is_ours: Callable[[Any], bool]  # backend value -> is it attn_dispatch (set by the backend module)
    ops_for: Callable[[torch.device], Any]  # device -> op group (set by the backend module)
    reuse_across_forwards: bool = True
    elide_model_mask: bool = True
    # (text mask as passed, op group, its identity key + image tokens + elided, JointMeta), most recent last
    memo: list = field(default_factory=list)


def install(
    model: torch.nn.Module, modules, *, backend, is_ours, ops_for, reuse_across_forwards: bool = True,
    elide_model_mask: bool = True,
) -> None:  # fmt: skip
    """Put the scope hooks on ``model`` (idempotent). ``modules``: its attention modules; ``backend``: the
    backend's enum member; ``is_ours(value)``: whether a processor's backend value selects it;
    ``ops_for(device)``: the op group there (None: the reference, so no metadata);
    ``reuse_across_forwards``: keep the joint metadata of the last few text-mask tensors;
    ``elide_model_mask``: hand the model no text mask where the joint metadata covers it (module doc)."""
    if getattr(model, "_attn_dispatch_scope", None) is not None:
        return
    recipe = recipe_for(model)
    mask_index, text_index, processor_cls = -1, -1, None
    if recipe is not None:
        names = list(inspect.signature(type(model).forward).parameters)[1:]
        mask_index, text_index = names.index(recipe.text_mask_arg), names.index(recipe.text_states_arg)
        processor_cls = getattr(importlib.import_module(recipe.processor_module), recipe.processor)
    pre = model.register_forward_pre_hook(_open_scope, with_kwargs=True)
    post = model.register_forward_hook(_close_scope, with_kwargs=True, always_call=True)
    model._attn_dispatch_scope = _Installed(
        recipe, mask_index, text_index, tuple(modules), processor_cls, backend, (pre, post), is_ours, ops_for,
        reuse_across_forwards, elide_model_mask,
    )  # fmt: skip


def uninstall(model: torch.nn.Module) -> None:
    installed = getattr(model, "_attn_dispatch_scope", None)
    if installed is not None:
        for handle in installed.handles:
            handle.remove()
        model._attn_dispatch_scope = None


@torch.compiler.disable
def _open_scope(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    installed: _Installed = model._attn_dispatch_scope
    joint = None
    if installed.recipe is not None:
        joint = _joint_meta(model, installed, args, kwargs)
    _stack.append(ForwardScope(model, joint))
    if joint is not None and joint.elided:  # the model's forward gets None for its text mask
        if installed.recipe.text_mask_arg in kwargs:
            return args, {**kwargs, installed.recipe.text_mask_arg: None}
        return (*args[: installed.mask_index], None, *args[installed.mask_index + 1 :]), kwargs
    return None


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
    text_mask = _argument(args, kwargs, recipe.text_mask_arg, installed.mask_index)
    hidden_states = _argument(args, kwargs, "hidden_states", 0)
    if not isinstance(text_mask, torch.Tensor) or text_mask.dim() != 2 or not isinstance(hidden_states, torch.Tensor):
        return None
    # Only when the backend would run the fast path in this forward: every processor stock and ours, and
    # no context parallelism (its processors go to diffusers' native backend with the model's mask).
    processor_cls, ours = installed.processor_cls, installed.backend
    for module in installed.modules:
        processor = module.processor
        if type(processor) is not processor_cls or getattr(processor, "_parallel_config", None) is not None:
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
    # Elided only where the model would accept this mask: the [B, L_txt] of its text states (else the
    # model gets the mask and raises its own error).
    text_states = _argument(args, kwargs, recipe.text_states_arg, installed.text_index)
    elided = (
        installed.elide_model_mask and isinstance(text_states, torch.Tensor) and text_states.dim() == 3
        and tuple(text_mask.shape) == tuple(text_states.shape[:2])
    )  # fmt: skip
    image_tokens = recipe.image_tokens(model, hidden_states)
    identity = _identity(text_mask)
    reuse = installed.reuse_across_forwards and identity is not None
    key = (identity, image_tokens, elided)
    memo = installed.memo if reuse else []
    for i, (held_mask, held_ops, held_key, held) in enumerate(memo):
        if held_ops is ops and held_key == key:  # the pipeline's same mask tensor, unwritten: same contents
            memo.append(memo.pop(i))
            return held
    batch = text_mask.shape[0]
    as_bool = text_mask if text_mask.dtype == torch.bool else text_mask.to(torch.bool)  # as the model does
    image = torch.ones((batch, image_tokens), dtype=torch.bool, device=device)
    joint = torch.cat([as_bool, image], dim=1)
    meta = JointMeta(batch, joint.shape[1], device, ops.build_mask_meta(joint), joint[:, None, None, :], elided)
    if reuse:
        memo.append((text_mask, ops, key, meta))  # holding the mask keeps its memory from reuse
        del memo[:-MEMO_SIZE]
    return meta


def _argument(args: tuple, kwargs: dict, name: str, index: int) -> Any:
    """A forward argument given by name or by position (``index``, self excluded), else None."""
    if name in kwargs:
        return kwargs[name]
    return args[index] if 0 <= index < len(args) else None
