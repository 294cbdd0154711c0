"""CPU: the CUDA-graph buffer logic of make_attention_plan(static_plan=...): fresh metadata copied into the
front of a persistent buffer sized for the largest captured batch, the tail zeroed, the captured plan
refreshed in place."""

from __future__ import annotations

import pytest
import torch
from attn_dispatch.plans import DEFAULT_PARAMS, AttentionParams
from attn_dispatch_cuda_fa3 import build_ops, stats
from fa3_batches import cumulative
from fa3_torch_provider import make_torch_provider

SLIDING = AttentionParams(window_size=(8, 0))
LAYERS = (DEFAULT_PARAMS, SLIDING)
MAX_BATCH, COLUMNS, PAGE = 8, 4, 16


class StaticInputs:
    """An engine's static CUDA-graph inputs: buffers for the largest batch; smaller batches use front views."""

    def __init__(self) -> None:
        self.cache_seqlens = torch.zeros(MAX_BATCH, dtype=torch.int32)
        self.page_table = torch.zeros(MAX_BATCH, COLUMNS, dtype=torch.int32)
        self.cu_seqlens_q = torch.zeros(MAX_BATCH + 1, dtype=torch.int32)

    def load(self, k_lens: list[int], seed: int) -> dict:
        """Copy a decode batch into the buffers (as an engine does before replay) and return plan args."""
        batch = len(k_lens)
        g = torch.Generator().manual_seed(seed)
        self.cache_seqlens[:batch] = torch.tensor(k_lens, dtype=torch.int32)
        self.page_table[:batch] = torch.randperm(64, generator=g)[: batch * COLUMNS].view(batch, COLUMNS).int()
        self.cu_seqlens_q[: batch + 1] = cumulative([1] * batch, "cpu")
        return dict(
            cache_seqlens=self.cache_seqlens[:batch], page_table=self.page_table[:batch],
            cu_seqlens_q=self.cu_seqlens_q[: batch + 1], max_seqlen_q=1, max_seqlen_k=COLUMNS * PAGE,
            page_size=PAGE, num_heads=4, num_kv_heads=2, head_dim=32, dtype=torch.bfloat16, layer_params=LAYERS,
        )  # fmt: skip


def fresh_metadata(provider, args: dict) -> dict:
    """What an eager plan for this batch holds (made from clones, so no buffer is shared)."""
    cloned = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    return build_ops(provider)["make_attention_plan"](**cloned).metadata


def test_largest_plan_owns_buffers_and_smaller_batches_share_them():
    provider, calls = make_torch_provider()
    make = build_ops(provider)["make_attention_plan"]
    static = StaticInputs()
    largest = make(**static.load([30] * MAX_BATCH, seed=0))
    assert {p: b.numel() for p, b in largest.metadata_buffers.items()} == {p: m.numel() for p, m in largest.metadata.items()}

    for params in LAYERS:  # poison the buffers: the tail must come back zeroed
        largest.metadata_buffers[params].fill_(-1)
    small_args = static.load([5, 17, 33], seed=1)
    small = make(**small_args, static_plan=largest)
    assert small is not largest and small.batch_size == 3
    want = fresh_metadata(provider, small_args)
    for params in LAYERS:
        buffer, view = largest.metadata_buffers[params], small.metadata[params]
        used = want[params].numel()
        assert small.metadata_buffers[params] is buffer
        assert view.data_ptr() == buffer.data_ptr() and view.numel() == used < buffer.numel()
        assert torch.equal(buffer[:used], want[params])
        assert (buffer[used:] == 0).all()
    assert stats.static_refreshes == 1


def test_replay_refresh_is_in_place_and_matches_an_eager_plan():
    provider, _ = make_torch_provider()
    ops = build_ops(provider)
    static = StaticInputs()
    largest = ops["make_attention_plan"](**static.load([40] * MAX_BATCH, seed=0))
    captured = ops["make_attention_plan"](**static.load([9, 3, 60, 1], seed=1), static_plan=largest)
    pointers = {p: m.data_ptr() for p, m in captured.metadata.items()}

    for step, k_lens in enumerate([[2, 64, 5, 11], [1, 1, 1, 1], [63, 7, 30, 44]]):
        args = static.load(k_lens, seed=10 + step)  # new seqlens and page table, same buffers
        refreshed = ops["make_attention_plan"](**args, static_plan=captured)
        assert refreshed is captured
        want = fresh_metadata(provider, args)
        for params in LAYERS:
            assert captured.metadata[params].data_ptr() == pointers[params]
            assert torch.equal(captured.metadata[params], want[params])
            used = want[params].numel()
            assert (captured.metadata_buffers[params][used:] == 0).all()


def test_refreshed_plan_computes_the_same_bytes_as_an_eager_plan():
    provider, _ = make_torch_provider()
    ops = build_ops(provider)
    static = StaticInputs()
    largest = ops["make_attention_plan"](**static.load([40] * MAX_BATCH, seed=0))
    captured = ops["make_attention_plan"](**static.load([9, 3, 60], seed=1), static_plan=largest)
    g = torch.Generator().manual_seed(3)
    k_cache, v_cache = (torch.randn(64, PAGE, 2, 32, generator=g).bfloat16() for _ in range(2))
    q = torch.randn(3, 4, 32, generator=g).bfloat16()
    args = static.load([17, 50, 2], seed=4)
    ops["make_attention_plan"](**args, static_plan=captured)
    eager = ops["make_attention_plan"](**{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in args.items()})
    for params in LAYERS:  # the strict provider also proves each layer got metadata for its own schedule
        a, b = torch.empty(3, 128, dtype=torch.bfloat16), torch.empty(3, 128, dtype=torch.bfloat16)
        ops["paged_attention_out"](q, k_cache, v_cache, a, plan=captured, params=params)
        ops["paged_attention_out"](q, k_cache, v_cache, b, plan=eager, params=params)
        assert torch.equal(a, b)


def test_static_plan_misuse_is_refused():
    provider, _ = make_torch_provider()
    make = build_ops(provider)["make_attention_plan"]
    static = StaticInputs()
    args = static.load([20, 20], seed=0)
    captured = make(**args)

    def refused(arg: str, **changes):
        with pytest.raises(ValueError, match=f"^{arg}: "):
            make(**{**args, **changes}, static_plan=captured)

    refused("cache_seqlens", cache_seqlens=args["cache_seqlens"].clone())  # not the captured buffer
    refused("page_table", page_table=args["page_table"].clone())
    refused("cu_seqlens_q", cu_seqlens_q=args["cu_seqlens_q"].clone())
    bigger = static.load([20, 20, 20], seed=1)
    refused("cache_seqlens", **bigger)  # more sequences than the captured plan holds
    refused("max_seqlen_q", max_seqlen_q=2)  # the graph was captured for one query token per sequence
    refused("layer_params", layer_params=(DEFAULT_PARAMS,))
    refused("static_plan", num_heads=8)
    other = build_ops(make_torch_provider(name="other")[0])["make_attention_plan"](**args)
    with pytest.raises(ValueError, match="^static_plan: "):
        make(**args, static_plan=other)


def test_original_path_and_metadata_free_providers_refresh_without_buffers():
    for provider, original in ((make_torch_provider()[0], True), (make_torch_provider(metadata=False)[0], False)):
        make = build_ops(provider, original=original)["make_attention_plan"]
        static = StaticInputs()
        captured = make(**static.load([20, 20], seed=0))
        assert make(**static.load([3, 50], seed=1), static_plan=captured) is captured
        assert captured.metadata == {} and captured.metadata_buffers == {}
