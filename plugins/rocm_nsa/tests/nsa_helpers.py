"""Shared by the rocm_nsa tests: query data, and a recorder of the aten ops a path runs."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attn_dispatch import reference

KV_LORA_RANK, ROPE_DIM = 512, 64  # NSA/DSA decode query: 576 = 512 absorbed nope + 64 rope
COPY_OPS = {"copy_", "_to_copy", "clone", "cat"}  # aten ops that only move bytes


class OpRecorder(TorchDispatchMode):
    """Records the name of every aten op run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))

    def copies(self) -> list[str]:
        return [name for name in self.ops if name in COPY_OPS]


def q_cat(tokens: int, heads: int, *, seed: int = 0, device: str = "cpu", dtype=torch.bfloat16) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, heads, KV_LORA_RANK + ROPE_DIM, generator=gen).to(dtype).to(device)


def hand_off(model_side, backend_side, q: torch.Tensor, *, decode_impl: str, is_decode: bool = True, llama_4_scaling=None):
    """Model side then backend side, as an engine runs them: returns ``(q_all, q_nope, q_rope)``."""
    q_for_backend, q_rope = model_side(
        q, None, is_decode=is_decode, decode_impl=decode_impl, kv_lora_rank=KV_LORA_RANK, llama_4_scaling=llama_4_scaling
    )
    return backend_side(q_for_backend, q_rope, num_heads=q.shape[1], kv_lora_rank=KV_LORA_RANK, decode_impl=decode_impl)


def original_hand_off(q: torch.Tensor, **kwargs):
    return hand_off(reference.mla_query_for_backend, reference.mla_decode_query, q, **kwargs)
