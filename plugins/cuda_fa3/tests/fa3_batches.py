"""Random paged and packed batches for the cuda_fa3 tests (CPU and GPU)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PagedBatch:
    q: torch.Tensor  # [tokens (+ padding rows), heads, head_dim]
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    plan_args: dict  # keyword arguments of make_attention_plan, layer_params aside
    tokens: int  # real query tokens (cu_seqlens_q[-1])

    def out(self, *, rows: int | None = None, flat: bool = True, fill: float = 7.0) -> torch.Tensor:
        """A poisoned output buffer with ``rows`` rows (default: q's rows), flat [rows, heads*dv] or 3-D."""
        rows = self.q.shape[0] if rows is None else rows
        heads, dv = self.q.shape[1], self.v_cache.shape[-1]
        shape = (rows, heads * dv) if flat else (rows, heads, dv)
        return torch.full(shape, fill, dtype=self.q.dtype, device=self.q.device)


def cumulative(lengths: list[int], device) -> torch.Tensor:
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    return cu.to(device)


def paged_batch(
    *,
    q_lens: list[int],
    k_lens: list[int],
    heads: int,
    kv_heads: int,
    head_dim: int,
    head_dim_v: int | None = None,
    page_size: int = 16,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    seed: int = 0,
    padding_rows: int = 0,
    spare_columns: int = 0,
) -> PagedBatch:
    """Sequence b has q_lens[b] new tokens and k_lens[b] keys (new ones included) in shuffled pages."""
    assert all(k >= q for q, k in zip(q_lens, k_lens))
    g = torch.Generator(device=device).manual_seed(seed)  # generate where the batch lives (fast on a GPU)
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    batch = len(q_lens)
    columns = -(-max(k_lens) // page_size) + spare_columns
    total_pages = batch * columns + 3
    k_cache = torch.randn(total_pages, page_size, kv_heads, head_dim, generator=g, device=device).to(dtype)
    v_cache = torch.randn(total_pages, page_size, kv_heads, head_dim_v, generator=g, device=device).to(dtype)
    page_table = torch.randperm(total_pages, generator=g, device=device)[: batch * columns].view(batch, columns)
    tokens = sum(q_lens)
    q = torch.randn(tokens + padding_rows, heads, head_dim, generator=g, device=device).to(dtype)
    plan_args = dict(
        cache_seqlens=torch.tensor(k_lens, dtype=torch.int32, device=device),
        page_table=page_table.to(device=device, dtype=torch.int32),
        cu_seqlens_q=cumulative(q_lens, device),
        max_seqlen_q=max(q_lens), max_seqlen_k=max(k_lens), page_size=page_size,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, head_dim_v=head_dim_v, dtype=dtype,
    )  # fmt: skip
    return PagedBatch(q, k_cache, v_cache, plan_args, tokens)


def packed_batch(
    *, lens: list[int], heads: int, kv_heads: int, head_dim: int, dtype=torch.bfloat16, device="cpu", seed: int = 0,
    k_lens: list[int] | None = None,
):  # fmt: skip
    """(q, k, v, varlen keyword arguments) over packed sequences: self-attention, or ``k_lens`` keys each."""
    g = torch.Generator(device=device).manual_seed(seed)
    k_lens = lens if k_lens is None else k_lens
    q = torch.randn(sum(lens), heads, head_dim, generator=g, device=device).to(dtype)
    k, v = (torch.randn(sum(k_lens), kv_heads, head_dim, generator=g, device=device).to(dtype) for _ in range(2))
    lengths = dict(cu_seqlens_q=cumulative(lens, device), cu_seqlens_k=cumulative(k_lens, device))
    return q, k, v, dict(**lengths, max_seqlen_q=max(lens), max_seqlen_k=max(k_lens))
