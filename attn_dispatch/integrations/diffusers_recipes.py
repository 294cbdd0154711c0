"""How known diffusers models build their attention mask: the joint-mask recipes.

A recipe says, for one stock model class, which forward argument holds the ``[B, L_txt]`` text mask,
where the text states are, and how many image tokens a forward has. Its stock processor builds every
block's key mask as ``cat([text mask as bool, ones(image tokens)])``, and uses the text mask for nothing
else (checked against diffusers 0.42's source: ``compute_text_seq_len_from_mask`` in Qwen-Image only
validates and converts it; PRX only builds the mask from it). That is what lets the per-forward scope
(``diffusers_scope``) build the metadata once before the blocks, and hand the blocks no mask at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class JointMaskRecipe:
    """How a model's processors build their key mask: ``cat([text mask as bool, ones(image tokens)])``.

    ``model``: a class name exported by ``diffusers``; ``processor``: its stock processor class, by name in
    ``processor_module``. ``text_mask_arg``: the forward argument holding the ``[B, L_txt]`` text mask
    (None: no mask, no metadata); ``text_states_arg``: the ``[B, L_txt, C]`` text states it masks.
    ``image_tokens(model, hidden_states)``: the number of image tokens for this forward.
    """

    model: str
    processor: str
    processor_module: str
    text_mask_arg: str
    text_states_arg: str
    image_tokens: Callable[[Any, torch.Tensor], int]


def _qwen_image_tokens(model: Any, hidden_states: torch.Tensor) -> int:
    return hidden_states.shape[1]  # already patchified: [B, image tokens, in_channels]


def _prx_image_tokens(model: Any, hidden_states: torch.Tensor) -> int:
    patch = model.config.patch_size  # [B, C, H, W] latents, cut into patch x patch tiles (img2seq)
    return (hidden_states.shape[-2] // patch) * (hidden_states.shape[-1] // patch)


RECIPES: tuple[JointMaskRecipe, ...] = (
    JointMaskRecipe(
        "QwenImageTransformer2DModel", "QwenDoubleStreamAttnProcessor2_0",
        "diffusers.models.transformers.transformer_qwenimage", "encoder_hidden_states_mask", "encoder_hidden_states",
        _qwen_image_tokens,
    ),
    JointMaskRecipe(
        "PRXTransformer2DModel", "PRXAttnProcessor2_0",
        "diffusers.models.transformers.transformer_prx", "attention_mask", "encoder_hidden_states", _prx_image_tokens,
    ),
)  # fmt: skip


def recipe_for(model: torch.nn.Module) -> JointMaskRecipe | None:
    """The recipe whose model class (with its own ``forward``) ``model`` is, or None."""
    import diffusers

    for recipe in RECIPES:
        cls = getattr(diffusers, recipe.model, None)
        if cls is not None and isinstance(model, cls) and type(model).forward is cls.forward:
            return recipe
    return None
