"""``attn_dispatch.integrations.unpad.RowMovers``: both routes move the same bytes as plain torch indexing.

Inputs are laid out as the transformers integration gets them: ``[B, L, H, D]`` views (``transpose(1, 2)``)
of ``[B, H, L, D]`` tensors, so never contiguous. The Triton route runs interpreted on CPU (the root
conftest sets ``TRITON_INTERPRET=1`` without a GPU), so the shapes are tiny; the GPU test at the end runs
it compiled, with bound launches, and checks it never syncs.
"""

from __future__ import annotations

import os

import pytest
import torch

from attn_dispatch.integrations import unpad
from attn_dispatch.integrations.unpad import RowMovers

INTERPRETED = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
ROUTES = [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1 or a GPU")),
]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

B, L, H, H_KV = 3, 5, 4, 2


def bits(x: torch.Tensor) -> torch.Tensor:
    """Bit patterns, so -0.0 vs 0.0 would show."""
    return x.view(torch.int16)


def valid_rows(padding: str, batch: int, length: int, *, device: str = DEVICE) -> torch.Tensor:
    """[batch, length] bool: row b holds ``length - b`` tokens (at least one), after (left) or before
    (right) its padding; ``none``: every token valid."""
    pos = torch.arange(length, device=device)
    count = (length - torch.arange(batch, device=device)).clamp(min=1)[:, None]
    if padding == "none":
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    if padding == "left":
        return pos >= length - count
    return pos < count


def flat_indices(valid: torch.Tensor) -> torch.Tensor:
    return valid.reshape(-1).nonzero().squeeze(1)  # int64, what transformers_meta.Packing.idx_q/idx_k hold


def heads_first(batch: int, heads: int, length: int, head_dim: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A ``[B, L, H, D]`` view of a transformers-style ``[B, H, L, D]`` tensor."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(batch, heads, length, head_dim, generator=gen, device=DEVICE).to(dtype).transpose(1, 2)


def reference_pack(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, *x.shape[2:])[indices]


def reference_scatter(packed: torch.Tensor, indices: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    out = torch.zeros(batch * length, *packed.shape[1:], dtype=packed.dtype, device=packed.device)
    out[indices] = packed
    return out.view(batch, length, *packed.shape[1:])


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype and got.is_contiguous()
    assert torch.equal(bits(got), bits(want))


# padding of the batch, and (q_len, kv_len): decode is one query per row against a left-padded cache
CASES = {"left": (L, L), "right": (L, L), "none": (L, L), "decode": (1, L)}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pack_and_scatter_match_torch_indexing(route, case, head_dim, dtype):
    q_len, kv_len = CASES[case]
    valid_k = valid_rows("left" if case == "decode" else case, B, kv_len)
    valid_q = valid_k[:, -q_len:]  # the last valid keys' queries (all of them outside decode)
    idx_q, idx_k = flat_indices(valid_q), flat_indices(valid_k)
    movers = RowMovers(idx_q, idx_k, B, q_len, kv_len, route=route)
    assert movers.route == route
    q = heads_first(B, H, q_len, head_dim, dtype, seed=0)
    k = heads_first(B, H_KV, kv_len, head_dim, dtype, seed=1)  # GQA: fewer K/V heads than Q heads
    v = heads_first(B, H_KV, kv_len, head_dim, dtype, seed=2)
    assert not k.is_contiguous()  # (q of one token is: a size-1 dim has no stride to break)

    assert_same(movers.pack_q(q), reference_pack(q, idx_q))
    k_p, v_p = movers.pack_kv(k, v)
    assert_same(k_p, reference_pack(k, idx_k))
    assert_same(v_p, reference_pack(v, idx_k))
    packed_out = torch.randn(idx_q.numel(), H, head_dim, device=DEVICE).to(dtype)
    assert_same(movers.scatter(packed_out), reference_scatter(packed_out, idx_q, B, q_len))


@pytest.mark.parametrize("route", ROUTES)
def test_a_second_layer_reuses_the_binding_and_kv_share_one_launch(route, monkeypatch):
    """Layers after the first find their launches bound (same layout, new tensors); K and V with the same
    strides are packed by one two-source gather, Q by a gather of its own."""
    rows_launch = pytest.importorskip("attn_dispatch_flash.rows_launch")
    binds = []
    bind_gather = rows_launch.bind_gather
    monkeypatch.setattr(
        rows_launch, "bind_gather", lambda like, indices: binds.append(len(like)) or bind_gather(like, indices)
    )
    valid = valid_rows("left", B, L)
    idx = flat_indices(valid)
    movers = RowMovers(idx, idx, B, L, L, route=route)
    for layer in range(2):
        q = heads_first(B, H, L, 64, torch.bfloat16, seed=3 * layer)
        k = heads_first(B, H_KV, L, 64, torch.bfloat16, seed=3 * layer + 1)
        v = heads_first(B, H_KV, L, 64, torch.bfloat16, seed=3 * layer + 2)
        assert_same(movers.pack_q(q), reference_pack(q, idx))
        k_p, v_p = movers.pack_kv(k, v)
        assert_same(k_p, reference_pack(k, idx))
        assert_same(v_p, reference_pack(v, idx))
    assert binds == ([1, 2] if route == "triton" else [])


@pytest.mark.parametrize("route", ROUTES)
def test_kv_of_different_layouts_and_a_strided_output(route):
    """K and V laid out differently (one launch each on the Triton route), an output with strided rows."""
    valid = valid_rows("right", B, L)
    idx = flat_indices(valid)
    movers = RowMovers(idx, idx, B, L, L, route=route)
    k = heads_first(B, H_KV, L, 64, torch.float16, seed=4)
    v = torch.randn(B, L, H_KV, 64, device=DEVICE).half()  # [B, L, H, D] contiguous
    k_p, v_p = movers.pack_kv(k, v)
    assert_same(k_p, reference_pack(k, idx))
    assert_same(v_p, reference_pack(v, idx))
    wide = torch.randn(idx.numel(), H, 96, device=DEVICE).half()
    packed_out = wide[:, :, 16:80]  # rows and heads strided
    assert_same(movers.scatter(packed_out), reference_scatter(packed_out, idx, B, L))


def test_both_routes_are_byte_identical_and_padded_rows_are_zero():
    if not INTERPRETED:
        pytest.skip("needs TRITON_INTERPRET=1 or a GPU")
    valid = valid_rows("left", B, L)
    idx = flat_indices(valid)
    q = heads_first(B, H, L, 64, torch.bfloat16, seed=5)
    by_route = {route: RowMovers(idx, idx, B, L, L, route=route) for route in ("torch", "triton")}
    packed = {route: m.pack_q(q) for route, m in by_route.items()}
    assert torch.equal(bits(packed["torch"]), bits(packed["triton"]))
    out = {route: m.scatter(packed[route]) for route, m in by_route.items()}
    assert torch.equal(bits(out["torch"]), bits(out["triton"]))
    assert torch.equal(bits(out["triton"][~valid]), bits(torch.zeros_like(out["triton"][~valid])))
    assert torch.equal(bits(out["triton"][valid]), bits(q[valid]))


def test_route_choice():
    idx = torch.arange(B * L, device=DEVICE)
    cuda = DEVICE == "cuda"
    assert RowMovers(idx, idx, B, L, L).route == ("triton" if cuda and unpad._rows_launch() else "torch")
    assert RowMovers(idx[:B], idx, B, 1, L).route == RowMovers(idx, idx, B, L, L).route  # decode too
    assert RowMovers(idx, idx, B, L, L, route="torch").route == "torch"
    with pytest.raises(ValueError, match="route"):
        RowMovers(idx, idx, B, L, L, route="cuda")


def test_triton_route_without_triton_is_refused(monkeypatch):
    monkeypatch.setattr(unpad, "_rows_launch", lambda: None)
    idx = torch.arange(B * L, device=DEVICE)
    assert RowMovers(idx, idx, B, L, L).route == "torch"
    with pytest.raises(ImportError, match="attn-dispatch-flash\\[rows\\]"):
        RowMovers(idx, idx, B, L, L, route="triton")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("route", ["triton", "torch"])
def test_no_host_sync_and_cuda_graph_replay(route):
    """At a prefill size: bound once (warm-up), then no call syncs, and a captured graph replays exactly."""
    batch, length, heads, kv_heads, head_dim = 4, 300, 16, 4, 128
    valid = valid_rows("left", batch, length)
    idx = flat_indices(valid)
    movers = RowMovers(idx, idx, batch, length, length, route=route)
    q = heads_first(batch, heads, length, head_dim, torch.bfloat16, seed=6)
    k = heads_first(batch, kv_heads, length, head_dim, torch.bfloat16, seed=7)
    v = heads_first(batch, kv_heads, length, head_dim, torch.bfloat16, seed=8)

    def step():
        q_p = movers.pack_q(q)
        k_p, v_p = movers.pack_kv(k, v)
        return q_p, k_p, v_p, movers.scatter(q_p)

    want = step()  # binds
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_same(want[0], reference_pack(q, idx))
    assert_same(want[1], reference_pack(k, idx))
    assert_same(want[2], reference_pack(v, idx))
    assert_same(want[3], reference_scatter(want[0], idx, batch, length))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    q.copy_(heads_first(batch, heads, length, head_dim, torch.bfloat16, seed=9))
    graph.replay()
    torch.cuda.synchronize()
    assert_same(captured[0], reference_pack(q, idx))
    assert_same(captured[3], reference_scatter(captured[0], idx, batch, length))
