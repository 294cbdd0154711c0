"""Conformance: our ops (``attn_dispatch.load("cuda")``) on the kernels' own upstream test grids, against a
plain torch reference with FlashAttention's error yardstick (see ``conformance_grid`` for the grids, their
sources and what is not covered). Every configuration must pass: one the installed FlashAttention build is
known to answer wrongly is answered by the known-wrong guard's dense route (``known_wrong.py``).

Run on its own: ``python3 -m pytest -m conformance plugins/cuda_fa3/tests/test_conformance.py``
(``ATTN_DISPATCH_CONFORMANCE=full`` for every configuration instead of the seeded sample; ``-k padded`` for
the padded-cache family only). A failure names the configuration, the op (paged, padded or packed), the
schedule, and our max/mean error next to what the yardstick allows. ``benchmarks/conformance_report.py``
runs the same grid as one table. The tests without a GPU check the grid's own machinery on CPU.
"""

from __future__ import annotations

import pytest
import torch
from attn_dispatch.plans import AttentionParams
from conformance_grid import Case, cases, run_case

GPU_OPS = ("make_attention_plan", "paged_attention_out", "varlen_attention_out", "bind_attention")


@pytest.fixture(scope="module")
def ops():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("FA3 needs an sm90 GPU")
    import attn_dispatch

    loaded = attn_dispatch.load("cuda")
    elsewhere = {op: loaded.resolutions[op].plugin for op in GPU_OPS if loaded.resolutions[op].plugin != "cuda_fa3"}
    if elsewhere:  # comparing the portable reference with itself would prove nothing
        pytest.skip(f"cuda_fa3 does not provide {elsewhere}: {loaded.summary()}")
    return loaded


def _check(ops, case: Case) -> None:
    with torch.inference_mode():
        outcomes = run_case(ops, case, "cuda")
    failed = [o for o in outcomes if not o.ok]
    report = f"{len(failed)}/{len(outcomes)} runs off the yardstick:\n" + "\n".join(o.line() for o in failed)
    assert not failed, report  # the known-wrong guard (known_wrong.py) must have answered its classes right


def _params(family: str):
    """One param per case, its id the description without spaces or brackets (usable with -k)."""
    def ident(i: int, case: Case) -> str:
        return f"{i}-" + case.describe().replace(", ", "-").replace("[", "").replace("]", "").replace(" ", "_")

    return [pytest.param(case, id=ident(i, case)) for i, case in enumerate(cases(family))]


@pytest.mark.cuda
@pytest.mark.conformance
@pytest.mark.parametrize("case", _params("vllm-decode"))
def test_vllm_paged_decode(ops, case):
    _check(ops, case)


@pytest.mark.cuda
@pytest.mark.conformance
@pytest.mark.parametrize("case", _params("vllm-varlen"))
def test_vllm_varlen_with_paged_kv(ops, case):
    _check(ops, case)


@pytest.mark.cuda
@pytest.mark.conformance
@pytest.mark.parametrize("case", _params("fa3-kvcache"))
def test_fa3_kvcache(ops, case):
    """Every num_splits x pack_gqa schedule from one plan, each called twice on it (metadata reuse)."""
    _check(ops, case)


@pytest.mark.cuda
@pytest.mark.conformance
@pytest.mark.parametrize("case", _params("fa3-kvcache-padded"))
def test_fa3_kvcache_padded(ops, case):
    """A contiguous cache read in place (FA3's batch mode, leftpad or not): every schedule from one padded
    plan, each bound run called twice; the packed op on the same keys."""
    _check(ops, case)


@pytest.mark.cuda
@pytest.mark.conformance
@pytest.mark.parametrize("case", _params("window-sweep"))
def test_window_sweep(ops, case):
    """Windows of many widths, prefill and decode: the class vllm 0.33.0's FA3 answers wrongly must come
    back right through the guard, and what the guard leaves on the kernel must be right too."""
    _check(ops, case)


def test_grid_reference_matches_the_portable_reference():
    """CPU: the suite's own torch reference means what attn_dispatch.reference means (bottom-right causal
    and windows, softcap, zeros for queries with no visible key, keys shorter than queries), so the GPU
    tests above judge our ops against the ops' contract."""
    import attn_dispatch

    schedules = (
        AttentionParams(causal=False, window_size=(3, 2)),
        AttentionParams(causal=True, softcap=5.0),
        AttentionParams(causal=True, window_size=(4, 0)),
    )
    case = Case("cpu-check", (3, 1, 5), (2, 40, 17), 4, 2, 16, 4, 64, torch.bfloat16, schedules, False, 0)
    outcomes = run_case(attn_dispatch.load("cpu"), case, "cpu")
    assert len(outcomes) == 2 * len(schedules)
    failed = [o.line() for o in outcomes if not o.ok]
    assert not failed, "\n".join(failed)


def _family_axes(case: Case) -> tuple:
    """A fa3-kvcache-padded case's upstream axes: (seqlen_q, seqlen_k), mask, kv heads, has_leftpad."""
    p = case.schedules[0]
    mask = "local" if p.window_size != (-1, -1) else "causal" if p.causal else "full"
    return (case.q_lens[0], case.seqlen_k), mask, case.kv_heads, any(case.key_starts)


def test_padded_family_is_upstreams_contiguous_cache_grid():
    """CPU: fa3-kvcache-padded is test_flash_attn_kvcache's page_size=None product (11 seqlen pairs x 3 masks
    x MHA/MQA/GQA x has_leftpad), its draws in upstream's ranges, 9 schedules per plan; the default sample
    keeps every axis value."""
    from conformance_grid import FA3_SEQLENS, SAMPLE, _fa3_padded_cases, grid_sizes

    full = _fa3_padded_cases()
    assert grid_sizes()["fa3-kvcache-padded"] == len(full) == 11 * 3 * 3 * 2
    assert len({_family_axes(c) for c in full}) == len(full)
    short_rows = 0
    for case in full:
        (seqlen_q, seqlen_k), mask, _, leftpad = _family_axes(case)
        assert case.padded and case.page_size == 0 and case.dtype == torch.bfloat16
        assert case.q_lens == (seqlen_q,) * 5 and case.heads == 6 and case.head_dim == 128
        assert all(0 <= s < e <= seqlen_k for s, e in zip(case.key_starts, case.k_lens))  # >= 1 key per row
        assert leftpad or case.key_starts == (0,) * 5
        left, right = case.schedules[0].window_size
        assert mask != "local" or (0 <= left < seqlen_k and 0 <= right < seqlen_k and not case.schedules[0].causal)
        scheduling = {(p.num_splits, p.pack_gqa) for p in case.schedules}
        assert len(case.schedules) == 9 and scheduling == {(s, g) for s in (0, 1, 3) for g in (None, False, True)}
        assert len({(p.causal, p.window_size, p.softcap) for p in case.schedules}) == 1
        short_rows += mask != "full" and any(e - s < seqlen_q for s, e in zip(case.key_starts, case.k_lens))
    assert short_rows > 0  # rows whose early queries see no key (zeros) are in the grid
    sample = cases("fa3-kvcache-padded")
    assert len(sample) == SAMPLE["fa3-kvcache-padded"] == 60
    for axis, values in enumerate((FA3_SEQLENS, ("full", "causal", "local"), (6, 1, 3), (False, True))):
        assert {_family_axes(c)[axis] for c in sample} == set(values)


def test_padded_grid_reference_matches_the_portable_reference():
    """CPU: for a padded case the suite's reference means what attn_dispatch.reference's padded plan means
    (keys start:end of each cache row, bottom-right alignment over them, zeros for a query seeing no key:
    FA3's answer), through the padded op and the packed op alike."""
    from conformance_grid import make_batch, reference

    import attn_dispatch

    schedules = (
        AttentionParams(causal=True),
        AttentionParams(causal=False),
        AttentionParams(causal=False, window_size=(3, 2)),
        AttentionParams(causal=True, window_size=(4, 0)),
        AttentionParams(causal=True, softcap=5.0),
    )
    # row 1 has 3 keys for 6 queries: under causal masks its first 3 queries see nothing
    case = Case("cpu-check", (6,) * 4, (12, 12, 7, 10), 4, 2, 16, 0, 0, torch.bfloat16, schedules, False, 0,
                key_starts=(0, 9, 0, 2), seqlen_k=12)  # fmt: skip
    ops = attn_dispatch.load("cpu")
    outcomes = run_case(ops, case, "cpu")
    assert len(outcomes) == 2 * len(schedules) and {o.op for o in outcomes} == {"padded", "packed"}
    failed = [o.line() for o in outcomes if not o.ok]
    assert not failed, "\n".join(failed)

    batch = make_batch(case, "cpu")
    for upcast in (True, False):
        exact = reference(case, batch, schedules[0], upcast=upcast).view(4, 6, 4, 16)
        assert bool((exact[1, :3] == 0).all()) and bool((exact[1, 3:] != 0).any())
    run = ops.bind_attention(ops.make_attention_plan(**batch.plan_args, layer_params=schedules), params=schedules[0])
    out = torch.full((4, 6, 4, 16), 7.0, dtype=torch.bfloat16)
    run(batch.q, batch.k_cache, batch.v_cache, out)
    assert bool((out[1, :3] == 0).all())
    # the packed keys are each row's start:end keys, in order
    assert torch.equal(batch.packed["k"][12:15], batch.k_cache[1, 9:12])
    assert batch.packed["cu_seqlens_k"].tolist() == [0, 12, 15, 22, 30]


def _some_padded_cases(pairs, **axes) -> list[Case]:
    """Full-grid fa3-kvcache-padded cases with these (seqlen_q, seqlen_k) pairs and, optionally, axis values."""
    from conformance_grid import _fa3_padded_cases

    names = ("mask", "kv_heads", "leftpad")
    return [
        c for c in _fa3_padded_cases()
        if _family_axes(c)[0] in pairs and all(axes.get(n, v) == v for n, v in zip(names, _family_axes(c)[1:]))
    ]  # fmt: skip


def test_padded_family_passes_on_the_reference_ops():
    """CPU: some of the family's own configurations (their batches and both references, full size) through
    the portable reference's ops pass the yardstick: the grid's inputs and references are consistent."""
    import attn_dispatch

    chosen = _some_padded_cases({(1, 128), (64, 256)}, kv_heads=3)
    assert len(chosen) == 12
    ops = attn_dispatch.load("cpu")
    for case in chosen:
        outcomes = run_case(ops, case, "cpu")
        assert len(outcomes) == 2 * 9
        failed = [o.line() for o in outcomes if not o.ok]
        assert not failed, "\n".join(failed)


@pytest.mark.parametrize("guarded", [False, True], ids=["unguarded", "vllm-0.33.0-guard"])
def test_padded_family_through_cuda_fa3_on_the_stand_in_provider(guarded):
    """CPU: cuda_fa3's ops over the torch stand-in provider (FA3's interface, the reference's math, the
    scheduler metadata checked by every forward) on a few of the family's configurations: one padded plan,
    its metadata made once per schedule and read by every bound run. As vllm 0.33.0, the local prefill
    layers go to the dense route (the known-wrong guard), which passes the yardstick too; decode stays on
    the kernel."""
    import types

    from attn_dispatch_cuda_fa3 import build_ops, stats
    from fa3_torch_provider import make_torch_provider

    provider, calls = make_torch_provider(name="vllm_fa3", version="0.33.0") if guarded else make_torch_provider()
    ops = types.SimpleNamespace(**build_ops(provider))
    local_prefill = _some_padded_cases({(64, 256)}, mask="local", kv_heads=3, leftpad=True)
    others = _some_padded_cases({(128, 128)}, mask="causal", kv_heads=1, leftpad=True)
    decode = _some_padded_cases({(1, 128)}, mask="local", kv_heads=6, leftpad=True)
    for case in local_prefill + others + decode:
        before = (calls.metadata, calls.fwd_with_metadata, stats.guarded_bindings)
        outcomes = run_case(ops, case, "cpu")
        failed = [o.line() for o in outcomes if not o.ok]
        assert not failed, "\n".join(failed)
        metadata, with_metadata, guarded_bindings = (now - then for now, then in zip((calls.metadata, calls.fwd_with_metadata, stats.guarded_bindings), before))
        rerouted = guarded and case in local_prefill
        assert metadata == 9  # one plan: metadata once per schedule
        # every padded run reads its schedule's metadata on the kernel (2 per schedule), none on the dense route
        assert with_metadata == (0 if rerouted else 18)
        assert (guarded_bindings > 0) == rerouted
