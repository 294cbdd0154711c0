"""Conformance: our ops (``attn_dispatch.load("cuda")``) on the kernels' own upstream test grids, against a
plain torch reference with FlashAttention's error yardstick (see ``conformance_grid`` for the grids, their
sources and what is not covered). Every configuration must pass: one the installed FlashAttention build is
known to answer wrongly is answered by the known-wrong guard's dense route (``known_wrong.py``).

Run on its own: ``python3 -m pytest -m conformance plugins/cuda_fa3/tests/test_conformance.py``
(``ATTN_DISPATCH_CONFORMANCE=full`` for every configuration instead of the seeded sample). A failure
names the configuration, the op (paged or packed), the schedule, and our max/mean error next to what the
yardstick allows. ``benchmarks/conformance_report.py`` runs the same grid as one table.
"""

from __future__ import annotations

import pytest
import torch
from attn_dispatch.plans import AttentionParams
from conformance_grid import Case, cases, run_case

GPU_OPS = ("make_attention_plan", "paged_attention_out", "varlen_attention_out")


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
