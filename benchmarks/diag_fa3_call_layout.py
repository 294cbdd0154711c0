"""Host time of one FA3 raw-op call, by how its 37 arguments are laid out (the provider's binding).

    python3 benchmarks/diag_fa3_call_layout.py

A Llama-like decode layer (8 sequences of up to 2048 keys, 32/8 heads of 64, left-padded batch mode),
eager, the GPU kept busy (the calls are enqueued back to back; each takes less GPU time than host time).
Compared in turns within one process, median of rounds:

* fields: the operator packet called with the arguments read from the FlashArgs on every call (the
  binding before this change);
* packet: the arguments laid out once, the overload still resolved on every call;
* bound: the arguments laid out once, the ``.default`` overload (``attn_dispatch_flash.fa3``'s binding now).
"""

from __future__ import annotations

import statistics
import time

import torch

from attn_dispatch_flash import FlashArgs
from attn_dispatch_flash.fa3 import vllm_fa3


def main() -> None:
    provider = vllm_fa3()
    ops = torch.ops._vllm_fa3_C
    batch, heads, kv_heads, head_dim, width = 8, 32, 8, 64, 2048
    q = torch.randn(batch, 1, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, width, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    out = torch.empty_like(q)
    ends = torch.full((batch,), width, dtype=torch.int32, device="cuda")
    starts = torch.arange(batch, dtype=torch.int32, device="cuda") * 200
    args = FlashArgs(
        seqused_k=ends, leftpad_k=starts, max_seqlen_q=1, max_seqlen_k=width, softmax_scale=head_dim**-0.5,
        causal=True, window_size=(-1, -1), softcap=0.0, num_splits=0, pack_gqa=None,
    )  # fmt: skip
    bound = provider.bind(args)

    def fields(q, k, v, out, a=args, fwd=ops.fwd):
        left, right = a.window_size
        return fwd(
            q, k, v, None, None, None, out, a.cu_seqlens_q, a.cu_seqlens_k, None, a.seqused_q, a.seqused_k,
            a.max_seqlen_q, a.max_seqlen_k, a.page_table, None, a.leftpad_k, None, None, None, None, None, None,
            a.softmax_scale, a.causal, left, right, a.softcap, True, a.scheduler_metadata, a.num_splits,
            a.pack_gqa, 0, None, 1, 0, None,
        )[0]  # fmt: skip

    rest = (None, None, None, None, ends, 1, width, None, None, starts, None, None, None, None, None, None,
            head_dim**-0.5, True, -1, -1, 0.0, True, None, 0, None, 0, None, 1, 0, None)  # fmt: skip

    def packet(q, k, v, out, fwd=ops.fwd):
        return fwd(q, k, v, None, None, None, out, *rest)[0]

    calls = {"fields": fields, "packet": packet, "bound": bound}
    reference = fields(q, k, v, out.clone())
    for name, call in calls.items():
        got = call(q, k, v, torch.empty_like(out))
        assert torch.equal(got, reference), name
    samples = {name: [] for name in calls}
    n = 400
    for round_ in range(31):
        for name in list(calls)[round_ % 3 :] + list(calls)[: round_ % 3]:
            call = calls[name]
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(n):
                call(q, k, v, out)
            samples[name].append((time.perf_counter() - start) / n * 1e6)
    torch.cuda.synchronize()
    med = {name: statistics.median(s) for name, s in samples.items()}
    print("host us per FA3 call, median of 31 rounds x 400 calls (same bytes from all three):")
    for name, us in med.items():
        print(f"  {name:7s} {us:6.2f}  ({us - med['fields']:+.2f} vs fields)")


if __name__ == "__main__":
    main()
