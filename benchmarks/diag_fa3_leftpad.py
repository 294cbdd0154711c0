"""Does FA3's raw op read left-padded rows in place as the zero-copy padded path would need? (GPU only)

    python3 benchmarks/diag_fa3_leftpad.py

Groundwork for a "padded" plan (see the closing note of issue 13): q/k/v stay transformers' ``[B, H, S, D]``
tensors, viewed as ``[B, S, H, D]``; FA3 runs in batch mode with ``seqused_k`` (each row's key end) and
``leftpad_k`` (its key start). For each case this prints, against the packed path (valid rows gathered,
``varlen_attention_out``, unpadded again) and the fp32 reference: the max error on valid query rows, whether
the bytes are equal, and whether padding query rows came out as zeros. Cases: left-padded prefill, decode
over a DynamicCache-like cache, decode over a StaticCache-like cache (keys end before the buffer does),
a sliding window, softcap, GQA, and the scheduler metadata made with ``cache_leftpad``.
"""

from __future__ import annotations

import time

import torch

import attn_dispatch
from attn_dispatch import AttentionParams, reference
from attn_dispatch_flash import FlashArgs


def main() -> int:
    if not torch.cuda.is_available():
        print("diag_fa3_leftpad: no CUDA device; nothing measured")
        return 0
    import attn_dispatch_cuda_fa3

    ops = attn_dispatch.load()
    provider = attn_dispatch_cuda_fa3.resolve_provider(ops.hardware.arch)
    raw = torch.ops._vllm_fa3_C
    g = torch.Generator(device="cuda").manual_seed(0)
    cases = [
        # name, batch lengths (valid tokens per row), q_len, buffer length, heads, kv_heads, d, params
        ("prefill left-padded", [128, 402, 676, 2048], None, 2048, 32, 8, 64, AttentionParams()),
        ("prefill GQA d128 softcap", [5, 300, 17, 999], None, 1000, 16, 4, 128, AttentionParams(softcap=30.0)),
        ("prefill window 255", [700, 1500, 64, 1024], None, 1500, 8, 4, 256, AttentionParams(window_size=(255, 0))),
        ("decode (DynamicCache)", [129, 403, 677, 2049], 1, 2049, 32, 8, 64, AttentionParams()),
        ("decode (StaticCache: buffer 4096)", [129, 403, 677, 2049], 1, 4096, 32, 8, 64, AttentionParams()),
    ]
    for name, lens, q_len, buffer, heads, kv_heads, d, params in cases:
        batch = len(lens)
        end = max(lens) if q_len is None else max(lens)  # every row's keys end at the same position
        q_len = end if q_len is None else q_len
        start = torch.tensor([end - n for n in lens], dtype=torch.int32, device="cuda")
        ends = torch.full((batch,), end, dtype=torch.int32, device="cuda")
        q = torch.randn(batch, heads, q_len, d, generator=g, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        k = torch.randn(batch, kv_heads, buffer, d, generator=g, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        v = torch.randn(batch, kv_heads, buffer, d, generator=g, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        out = torch.full((batch, q_len, heads, d), 7.0, device="cuda", dtype=torch.bfloat16)
        scale = d**-0.5
        args = FlashArgs(
            max_seqlen_q=q_len, max_seqlen_k=buffer, softmax_scale=scale, causal=params.causal, seqused_k=ends,
            leftpad_k=start, window_size=params.window_size, softcap=params.softcap,
        )  # fmt: skip
        try:
            provider.bind(args)(q, k, v, out)
        except Exception as exc:  # noqa: BLE001  (a diagnostic: say what FA3 refused)
            print(f"{name}: FA3 refused: {type(exc).__name__}: {str(exc)[:300]}")
            continue
        # The packed path: valid query rows are each row's last (q_len - pad) or its one decode query.
        q_valid = [min(n, q_len) for n in lens]
        rows_q = torch.cat([torch.arange(q_len - m, q_len, device="cuda") + b * q_len for b, m in enumerate(q_valid)])
        rows_k = torch.cat([torch.arange(end - n, end, device="cuda") + b * buffer for b, n in enumerate(lens)])
        qp = q.reshape(batch * q_len, heads, d)[rows_q]
        kp, vp = (x.reshape(batch * buffer, kv_heads, d)[rows_k] for x in (k, v))
        cu_q = torch.tensor([0, *torch.tensor(q_valid).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
        cu_k = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
        lengths = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(q_valid), max_seqlen_k=max(lens))
        packed = torch.empty_like(qp)
        ops.varlen_attention_out(qp, kp, vp, packed, **lengths, params=params, softmax_scale=scale)
        want = torch.empty(qp.shape, dtype=torch.float32, device="cuda")
        reference.varlen_attention_out(qp.float(), kp.float(), vp.float(), want, **lengths, params=params, softmax_scale=scale)
        got = out.reshape(batch * q_len, heads, d)[rows_q]
        pad = torch.ones(batch * q_len, dtype=torch.bool, device="cuda")
        pad[rows_q] = False
        pad_rows = out.reshape(batch * q_len, heads, d)[pad]
        print(
            f"{name}: max err vs fp32 reference {(got.float() - want).abs().max().item():.4g} (packed path "
            f"{(packed.float() - want).abs().max().item():.4g}); bytes equal to the packed path: "
            f"{torch.equal(got, packed)}; padding query rows zero: {bool((pad_rows == 0).all()) if pad_rows.numel() else 'none'}",
            flush=True,
        )  # fmt: skip
        try:  # the metadata made with cache_leftpad, handed to the same forward
            metadata = raw.get_scheduler_metadata(
                batch, q_len, buffer, heads, kv_heads, d, d, q.dtype, ends, None, None, None, None, start, None, 0,
                params.causal, params.window_size[0], params.window_size[1], params.softcap > 0, 0, None, 0,
            )  # fmt: skip
            again = torch.full_like(out, 7.0)
            provider.bind(args._replace(scheduler_metadata=metadata))(q, k, v, again)
            print(f"{name}: with scheduler metadata (cache_leftpad): bytes equal: {torch.equal(again, out)}", flush=True)
        except Exception as exc:  # noqa: BLE001
            print(f"{name}: metadata with cache_leftpad refused: {type(exc).__name__}: {str(exc)[:300]}")
        if q_len == 1:  # host time per call: one in-place batch call against the packed route's varlen call
            bound = provider.bind(args)
            for label, call in (
                ("batch (leftpad)", lambda: bound(q, k, v, out)),
                ("packed varlen", lambda: ops.varlen_attention_out(qp, kp, vp, packed, **lengths, params=params, softmax_scale=scale)),
            ):  # fmt: skip
                times = []
                for _ in range(5):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    for _ in range(200):
                        call()
                    t1 = time.perf_counter()
                    torch.cuda.synchronize()
                    times.append((t1 - t0) / 200 * 1e6)
                print(f"{name}: {label}: host us per call (min of 5 x 200) {min(times):.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
