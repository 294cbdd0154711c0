"""Tiny diffusers models (random weights) and op groups for the integration tests."""

from __future__ import annotations

import torch
from diffusers import ModelMixin, PRXTransformer2DModel, QwenImageTransformer2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_dispatch import dispatch_attention_fn

IN_CHANNELS, TEXT_DIM = 16, 24


def tiny_qwen(dtype: torch.dtype = torch.bfloat16, layers: int = 2) -> QwenImageTransformer2DModel:
    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(
        patch_size=2, in_channels=IN_CHANNELS, out_channels=4, num_layers=layers, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=TEXT_DIM, axes_dims_rope=(8, 12, 12),
    )  # fmt: skip
    return model.to(dtype).eval()


def qwen_inputs(text_mask: torch.Tensor, dtype: torch.dtype = torch.bfloat16, h: int = 4, w: int = 4, seed: int = 1) -> dict:
    """Forward kwargs for :func:`tiny_qwen`: ``text_mask`` ``[B, L_txt]`` (bool, or 0/1 ints)."""
    batch, text = text_mask.shape
    gen = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, h * w, IN_CHANNELS, generator=gen).to(dtype),
        encoder_hidden_states=torch.randn(batch, text, TEXT_DIM, generator=gen).to(dtype),
        encoder_hidden_states_mask=text_mask,
        timestep=torch.full((batch,), 500.0, dtype=dtype),
        img_shapes=[[(1, h, w)]] * batch,
    )


def tiny_prx(dtype: torch.dtype = torch.bfloat16) -> PRXTransformer2DModel:
    torch.manual_seed(0)
    model = PRXTransformer2DModel(
        in_channels=4, patch_size=2, context_in_dim=TEXT_DIM, hidden_size=64, mlp_ratio=2.0, num_heads=2,
        depth=2, axes_dim=[16, 16],
    )  # fmt: skip
    return model.to(dtype).eval()


def prx_inputs(text_mask: torch.Tensor, dtype: torch.dtype = torch.bfloat16, h: int = 8, w: int = 8, seed: int = 1) -> dict:
    batch, text = text_mask.shape
    gen = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 4, h, w, generator=gen).to(dtype),
        timestep=torch.full((batch,), 0.5, dtype=dtype),
        encoder_hidden_states=torch.randn(batch, text, TEXT_DIM, generator=gen).to(dtype),
        attention_mask=text_mask,
    )


class CrossAttnProcessor:
    """Text cross-attention passing ONE mask object (as a ``[B, 1, 1, L]`` view) to every block."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None):
        b = hidden_states.shape[0]
        q = attn.to_q(hidden_states).view(b, -1, attn.heads, attn.head_dim)
        k = attn.to_k(encoder_hidden_states).view(b, -1, attn.heads, attn.head_dim)
        v = attn.to_v(encoder_hidden_states).view(b, -1, attn.heads, attn.head_dim)
        mask = None if attention_mask is None else attention_mask[:, None, None, :]
        out = dispatch_attention_fn(q, k, v, attn_mask=mask, backend=self._attention_backend, parallel_config=self._parallel_config)
        return attn.to_out(out.flatten(2, 3))


class CrossAttention(torch.nn.Module, AttentionModuleMixin):
    _default_processor_cls = CrossAttnProcessor
    _available_processors = [CrossAttnProcessor]

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.to_q, self.to_k, self.to_v, self.to_out = (torch.nn.Linear(dim, dim) for _ in range(4))
        self.set_processor(CrossAttnProcessor())

    def forward(self, hidden_states, encoder_hidden_states, attention_mask=None):
        return self.processor(self, hidden_states, encoder_hidden_states, attention_mask)


class TinyCrossAttnModel(ModelMixin, ConfigMixin):
    """Blocks of text cross-attention with one bool ``[B, L_txt]`` padding mask (no joint-mask recipe)."""

    @register_to_config
    def __init__(self, dim: int = 64, heads: int = 2, num_blocks: int = 3):
        super().__init__()
        self.blocks = torch.nn.ModuleList(CrossAttention(dim, heads) for _ in range(num_blocks))

    def forward(self, hidden_states, encoder_hidden_states, encoder_attention_mask=None):
        for block in self.blocks:
            hidden_states = hidden_states + block(hidden_states, encoder_hidden_states, encoder_attention_mask)
        return hidden_states


def tiny_cross(dtype: torch.dtype = torch.bfloat16) -> TinyCrossAttnModel:
    torch.manual_seed(0)
    return TinyCrossAttnModel().to(dtype).eval()


class CountingOps:
    """Wraps an op group; counts ``build_mask_meta`` and (eager) ``masked_attention`` calls."""

    def __init__(self, inner):
        self.inner, self.builds, self.calls = inner, 0, 0
        self.key_masks: list[torch.Tensor] = []  # the key mask of each eager call's metadata, as used

    def build_mask_meta(self, key_mask):
        self.builds += 1
        return self.inner.build_mask_meta(key_mask)

    def masked_attention(self, q, k, v, mask_meta, *, softmax_scale=None):
        if not torch.compiler.is_compiling():  # a traced counter would be a guard, recompiling every call
            self.calls += 1
            self.key_masks.append(mask_meta.key_mask.clone())
        return self.inner.masked_attention(q, k, v, mask_meta, softmax_scale=softmax_scale)


def stand_in_ops():
    """The varlen_diffusion op group over the CPU stand-in provider, and the provider's call log."""
    from attn_dispatch_varlen_diffusion.attention import build_ops
    from varlen_torch_provider import make_torch_provider

    provider = make_torch_provider()
    return CountingOps(build_ops(provider, device_type="cpu")), provider.fwd.calls


def reference_ops():
    """The original path (SDPA with a bool key mask) as an op group: traceable, for compile tests."""
    from attn_dispatch.reference import masked

    return CountingOps(masked)
