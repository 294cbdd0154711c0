"""A CPU stand-in for a FlashAttention provider: ``FlashProvider.fwd``'s varlen contract in plain torch.

Semantics copied from FA3 varlen (non-causal, no window, GQA when K/V have fewer heads): sequence ``b`` reads query rows
``cu_seqlens_q[b] : + seqused_q[b]`` (or up to ``cu_seqlens_q[b + 1]`` without seqused) and the key rows
likewise; only those output rows are written; a sequence with no keys gets zeros. Rows no sequence
covers keep what ``out`` held, and NaN when the provider allocates ``out`` itself (FA3 leaves them
uninitialised), so a caller that relies on them fails loudly.

``metadata=True`` gives it a ``scheduler_metadata`` function, as FA3's providers have; ``fwd.metadata_counts``
counts the metadata made (``builds``) and the forwards handed one (``calls``).
"""

from __future__ import annotations

import os

import pytest
import torch

from attn_dispatch_flash import FlashProvider

# CPU tests run the plugin's Triton kernels on CPU tensors, which only the interpreter can do. It is
# switched on by the conftest when no GPU is present; on a GPU machine those tests skip (TRITON_INTERPRET
# is process-wide, and the GPU tests need compiled kernels).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="CPU kernel tests need TRITON_INTERPRET=1 (set when no GPU is present)")


def make_torch_provider(
    *, has_seqused_q: bool = True, writes_out: bool = True, name: str = "torch_varlen", metadata: bool = False
) -> FlashProvider:
    calls: list[dict] = []
    paged_calls: list[bool] = []  # per call: were K/V read as pages
    counts = {"builds": 0, "calls": 0}

    def scheduler_metadata(**schedule) -> torch.Tensor:
        counts["builds"] += 1
        return torch.zeros(1 + 2 * schedule["batch_size"], dtype=torch.int32)

    def fwd(
        q, k, v, *, out=None, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None, seqused_k=None,
        max_seqlen_q, max_seqlen_k, page_table=None, softmax_scale, causal, window_size=(-1, -1),
        softcap=0.0, scheduler_metadata=None, num_splits=0, pack_gqa=None, leftpad_k=None,
    ):  # fmt: skip
        if leftpad_k is not None:
            raise NotImplementedError("leftpad_k: the stand-in computes packed and paged calls only")
        assert not causal and tuple(window_size) == (-1, -1) and softcap == 0.0
        if page_table is not None:  # paged K/V: [pages, page_size, H_kv, D]; each sequence's keys via its row
            assert cu_seqlens_k is None and seqused_k is not None and k.dim() == v.dim() == 4
            page_size, used = k.shape[1], seqused_k.tolist()
            rows = [page_table[b, : -(-n // page_size)].long() for b, n in enumerate(used)]
            k, v = (torch.cat([x[r].flatten(0, 1)[:n] for r, n in zip(rows, used)]) for x in (k, v))
            cu_seqlens_k = torch.tensor([0, *torch.tensor(used).cumsum(0).tolist()], dtype=torch.int32)
        assert q.dim() == k.dim() == v.dim() == 3 and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
        assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32
        assert has_seqused_q or seqused_q is None, "this provider has no seqused_q"
        assert writes_out or out is None, "this provider cannot write into out"
        counts["calls"] += scheduler_metadata is not None
        calls.append({"seqused_q": seqused_q is not None, "seqused_k": seqused_k is not None, "out": out is not None})
        paged_calls.append(page_table is not None)
        if out is None:
            out = torch.full_like(q, float("nan"), memory_format=torch.contiguous_format)
        assert q.shape[1] % k.shape[1] == 0 and k.shape == v.shape, "GQA: K/V heads must divide Q heads"
        assert out.shape == q.shape
        cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        used_q = seqused_q.tolist() if seqused_q is not None else [b - a for a, b in zip(cu_q, cu_q[1:])]
        used_k = seqused_k.tolist() if seqused_k is not None else [b - a for a, b in zip(cu_k, cu_k[1:])]
        for q0, lq, k0, lk in zip(cu_q, used_q, cu_k, used_k):
            assert 0 <= lq <= max_seqlen_q and 0 <= lk <= max_seqlen_k
            assert q0 + lq <= q.shape[0] and k0 + lk <= k.shape[0], "sequence runs past the tensor"
            if lq == 0:
                continue
            if lk == 0:
                out[q0 : q0 + lq] = 0
                continue
            qs, ks, vs = (x.float() for x in (q[q0 : q0 + lq], k[k0 : k0 + lk], v[k0 : k0 + lk]))
            group = q.shape[1] // k.shape[1]  # GQA: K/V head h serves query heads h * group ... + group - 1
            ks, vs = ks.repeat_interleave(group, dim=1), vs.repeat_interleave(group, dim=1)
            probs = torch.softmax(torch.einsum("qhd,khd->hqk", qs, ks) * softmax_scale, dim=-1)
            out[q0 : q0 + lq] = torch.einsum("hqk,khd->qhd", probs, vs).to(out.dtype)
        return out

    fwd.calls = calls  # what each call passed, for tests that check the route taken
    fwd.paged_calls = paged_calls
    fwd.metadata_counts = counts
    return FlashProvider(
        name, 3, fwd, scheduler_metadata if metadata else None, writes_out=writes_out, has_seqused_q=has_seqused_q
    )  # fmt: skip
