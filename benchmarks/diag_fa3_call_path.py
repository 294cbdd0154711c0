"""How much of FA3's host time per call is Python handing the raw op its 37 arguments?

    python benchmarks/diag_fa3_call_path.py [--rounds 30] [--calls 100]

The provider's bound call (``FlashProvider.bind``: the raw op with its arguments laid out once) passes
all 37 arguments from Python on every call, and each is converted against the op's schema. The same call
through a TorchScript function whose code holds the constant arguments as literals passes only the
tensors. Rows take turns (order rotated per round), each round timing ``--calls`` calls with the GPU kept
busy (``torch.cuda._sleep``): host us per call, min and median over rounds. Outputs compared with
``torch.equal``. Shapes: Qwen-Image's joint attention with packed keys (B=1, 4352 queries over 4312 keys,
24 heads, d=128, bf16).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import attn_dispatch_flash as flash_providers
from attn_dispatch import detect
from attn_dispatch_flash.args import FlashArgs


def scripted(bound):
    """The bound raw-op call as a TorchScript function ``f(q, k, v, out, *tensors)``, with every non-tensor
    argument written into its code; None where the bound call is not the raw-op layout."""
    cells = dict(zip(bound.__code__.co_freevars, (c.cell_contents for c in bound.__closure__ or ())))
    rest, op = cells.get("rest"), cells.get("fa3_fwd")
    if rest is None or op is None:
        return None, ()
    namespace, name = op.name().split("::")
    params, values, tensors = [], [], []
    for i, x in enumerate(rest):
        if isinstance(x, torch.Tensor):
            params.append(f"t{i}: Tensor")
            values.append(f"t{i}")
            tensors.append(x)
        else:
            values.append(repr(x))
    src = (
        f"def call(q: Tensor, k: Tensor, v: Tensor, out: Optional[Tensor], {', '.join(params)}) -> Tensor:\n"
        f"    return torch.ops.{namespace}.{name.split('.')[0]}(q, k, v, None, None, None, out, {', '.join(values)})[0]\n"
    )
    return torch.jit.CompilationUnit(src).call, tuple(tensors)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=100)
    args = parser.parse_args()
    provider, reason = flash_providers.probe(flash_providers.probe_order(detect(0).arch))
    if provider is None:
        raise SystemExit(f"no FlashAttention provider: {reason}")
    dev, dt = torch.device("cuda"), torch.bfloat16
    sq, sk, heads, d = 4352, 4312, 24, 128
    q = torch.randn(sq, heads, d, device=dev, dtype=dt)
    k, v = (torch.randn(sk, heads, d, device=dev, dtype=dt) for _ in range(2))
    cu_q = torch.tensor([0, sq], dtype=torch.int32, device=dev)
    cu_k = torch.tensor([0, sk], dtype=torch.int32, device=dev)
    bound = provider.bind(FlashArgs(
        cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=sq, max_seqlen_k=sk, softmax_scale=d**-0.5, causal=False,
    ))  # fmt: skip
    script, tensors = scripted(bound)
    print(f"provider: {provider.describe()}; scripted: {script is not None}")
    rows = {"raw op from Python (bound)": lambda: bound(q, k, v, None)}
    if script is not None:
        rows["raw op through TorchScript"] = lambda: script(q, k, v, None, *tensors)
        a, b = rows["raw op from Python (bound)"](), rows["raw op through TorchScript"]()
        torch.cuda.synchronize()
        print(f"outputs equal: {torch.equal(a, b)}")
    names = list(rows)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for fn in rows.values():
        fn()
    for round_ in range(args.rounds):
        turn = names[round_ % len(names) :] + names[: round_ % len(names)]
        for n in turn:
            torch.cuda.synchronize()
            torch.cuda._sleep(int(4e8))
            start = time.perf_counter()
            for _ in range(args.calls):
                rows[n]()
            samples[n].append((time.perf_counter() - start) / args.calls * 1e6)
            torch.cuda.synchronize()
    for n in names:
        print(f"| {n} | min {min(samples[n]):.1f} us | median {statistics.median(samples[n]):.1f} us |")
    if len(names) == 2:
        paired = statistics.median(a - b for a, b in zip(samples[names[0]], samples[names[1]]))
        print(f"median paired difference (Python - TorchScript): {paired:+.1f} us per call")


if __name__ == "__main__":
    main()
